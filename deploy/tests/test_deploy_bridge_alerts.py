"""deploy/bridge-alerts.yml: alerting rules for s3net-pacs-bridge, as an on-call operator loads
them. Each rule is well formed (as deploy/alerts.yml's are), its expression parses as PromQL,
and every metric it reads is one a real bridge exports (its /metrics, read over HTTP from a
bridge listening on loopback). Prometheus itself does not run here."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from deploy_common import DEPLOY, ROOT, free_port, load_yaml
from promql_support import check_reads, check_rule, exported

ALERTS = DEPLOY / "bridge-alerts.yml"


def rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def test_rules_are_well_formed():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)) >= 5, names
    server_rules = {r["alert"] for g in load_yaml(DEPLOY / "alerts.yml")["groups"] for r in g["rules"]}
    assert not set(names) & server_rules, "names shared with alerts.yml"
    for r in rules():
        check_rule(r, r"S3netBridge[A-Z][A-Za-z]+")


def test_every_metric_and_label_they_read_is_exported_by_a_bridge():
    pytest.importorskip("pynetdicom")
    sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))
    from s3net_client import Client
    from s3net_client.bridge import Bridge, Node

    with Client(f"127.0.0.1:{free_port()}", retries=0) as client:
        bridge = Bridge(client, Node("PACS", "127.0.0.1", free_port()), host="127.0.0.1", port=free_port()).start()
        metrics = bridge.serve_metrics("127.0.0.1", 0)
        try:
            url = f"http://127.0.0.1:{metrics.server_address[1]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as r:
                series = exported(r.read().decode())
        finally:
            metrics.shutdown()
            bridge.stop()
    series["up"] = {"job": {"s3net-pacs-bridge"}, "instance": None}
    for r in rules():
        check_reads(r["alert"], r["expr"], series)
