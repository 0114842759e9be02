"""deploy/grafana: the dashboard an operator opens, and its provisioning in docker-compose.yml.

The dashboard is well formed (unique panel ids, every panel on the grid, a data source taken
from its `datasource` variable so it imports into any Grafana), every query parses as PromQL and
reads only metrics and labels the running server exports, and every metric the server exports
is on some panel: a metric added to the server without a panel fails here. Grafana itself does
not run here; how the panels look is not tested."""

from __future__ import annotations

import json
import re

import promql_parser

from deploy_common import DEPLOY, PROMETHEUS_PORT, ROOT, load_yaml
from promql_support import SOMETIMES, check_reads

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "s3net.json"

# Grafana's own variables, as Prometheus would see them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def queries(d: dict) -> list[tuple[str, str]]:
    """(panel title and ref id, PromQL with Grafana's variables filled in) of every query."""
    found = []
    for p in panels(d):
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (p["title"], t["expr"])
            found.append((f"{p['title']} {t['refId']}", expr))
    return found


def test_the_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] == "s3net-overview" and d["title"] == "s3net"
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), ids
    cells = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        # No two panels on the same cell of the grid.
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["title"].strip() and len(p["description"].split()) >= 8, p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            # Every query follows the replica picker.
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    for where, expr in queries(d):
        promql_parser.parse(expr)  # raises on a syntax error


def test_every_query_reads_what_the_server_exports_and_every_metric_has_a_panel(exported_series):
    read = set()
    for where, expr in queries(dashboard()):
        read |= set(check_reads(where, expr, exported_series))
    families = set()
    for name in exported_series:
        if name.startswith("s3net_"):
            families.add(re.sub(r"_(bucket|sum|count|created)$", "", name))
    families |= set(SOMETIMES)
    shown = {re.sub(r"_(bucket|sum|count|created)$", "", n) for n in read}
    missing = sorted(f for f in families if f not in shown and f + "_total" not in shown)
    assert not missing, f"metrics on no panel: {missing}"


def test_compose_provisions_the_data_source_and_the_dashboard():
    compose = load_yaml(ROOT / "docker-compose.yml")["services"]
    grafana = compose["grafana"]
    mounts = dict(v.removesuffix(":ro").split(":") for v in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    assert "prometheus" in compose and "prometheus" in grafana["depends_on"]
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "s3net.yml")["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_dir
    # Anonymous visitors view; they do not edit.
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
