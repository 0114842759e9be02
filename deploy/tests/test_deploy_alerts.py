"""deploy/alerts.yml: Prometheus alerting rules an on-call operator can load as they are.

Each rule is well formed (name, severity, summary, description), its expression parses as
PromQL, and every metric and label it reads is one the running server exports: a server is
started with a replica listed that is down, and made to refuse a request and to fail a
forwarded call, so that the labels those alerts read have series. A renamed metric or label
fails here instead of silencing an alert. Prometheus itself does not run here; what the rules
do once loaded (firing on real trouble) is not tested. Needs target/release/s3net."""

from __future__ import annotations

from deploy_common import DEPLOY, ROOT, load_yaml
from promql_support import check_reads, check_rule

ALERTS = DEPLOY / "alerts.yml"


def rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def test_rules_are_well_formed():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)), names
    assert len(names) >= 10
    for r in rules():
        check_rule(r, r"S3net[A-Z][A-Za-z]+")


def test_prometheus_of_compose_loads_them():
    prom = load_yaml(DEPLOY / "prometheus.yml")
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    volumes = load_yaml(ROOT / "docker-compose.yml")["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def test_every_metric_and_label_they_read_is_exported(exported_series):
    for r in rules():
        check_reads(r["alert"], r["expr"], exported_series)
