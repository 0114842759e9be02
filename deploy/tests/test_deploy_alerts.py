"""deploy/alerts.yml: Prometheus alerting rules an on-call operator can load as they are.

Each rule is well formed (name, severity, summary, description), its expression parses as
PromQL, and every metric and label it reads is one the running server exports: a server is
started with a replica listed that is down, and made to refuse a request and to fail a
forwarded call, so that the labels those alerts read have series. A renamed metric or label
fails here instead of silencing an alert. Prometheus itself does not run here; what the rules
do once loaded (firing on real trouble) is not tested. Needs target/release/s3net."""

from __future__ import annotations

import re
import urllib.request

import promql_parser
import pytest

from deploy_common import BINARY, DEPLOY, ROOT, SERVER_SRC, Server, binary_available, free_port, load_yaml

ALERTS = DEPLOY / "alerts.yml"

# Metrics only a server with a GPU registers (crates/server/src/metrics.rs), with their labels.
GPU_ONLY = {"s3net_gpu_memory_used_bytes": {"device"}, "s3net_gpu_memory_total_bytes": {"device"}}
# Labels Prometheus adds to every scraped series, and its own `up` series.
TARGET_LABELS = {"instance", "job"}


def rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]


def selectors(node) -> list[tuple[str, list]]:
    """(metric name, matchers) of every vector selector in a parsed expression."""
    if isinstance(node, promql_parser.VectorSelector):
        return [(node.name, list(node.matchers.matchers))]
    found = []
    for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            found += selectors(child)
    for arg in getattr(node, "args", None) or []:
        found += selectors(arg)
    return found


def grouping_labels(node) -> set[str]:
    """The labels of every `by (...)` / `on (...)` in a parsed expression."""
    found: set[str] = set()
    modifier = getattr(node, "modifier", None)
    labels = getattr(modifier, "labels", None) if modifier is not None else None
    if labels:
        found |= set(labels)
    matching = getattr(modifier, "matching", None) if modifier is not None else None
    if matching is not None and getattr(matching, "labels", None):
        found |= set(matching.labels)
    for attr in ("lhs", "rhs", "expr"):
        child = getattr(node, attr, None)
        if child is not None:
            found |= grouping_labels(child)
    for arg in getattr(node, "args", None) or []:
        found |= grouping_labels(arg)
    return found


def test_rules_are_well_formed():
    names = [r["alert"] for r in rules()]
    assert len(names) == len(set(names)), names
    assert len(names) >= 10
    for r in rules():
        name = r["alert"]
        assert re.fullmatch(r"S3net[A-Z][A-Za-z]+", name), name
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, name
        promql_parser.parse(r["expr"])  # raises on a syntax error
        if "for" in r:
            assert re.fullmatch(r"\d+[smh]", r["for"]), (name, r["for"])
        assert r["labels"]["severity"] in {"critical", "warning"}, name
        a = r["annotations"]
        assert a["summary"].strip() and len(a["description"].split()) >= 10, name
        # Templates read only the alert's labels and value.
        for text in a.values():
            for ref in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.match(r"\s*\$(labels\.\w+|value)\b", ref), (name, ref)


def test_prometheus_of_compose_loads_them():
    prom = load_yaml(DEPLOY / "prometheus.yml")
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    volumes = load_yaml(ROOT / "docker-compose.yml")["services"]["prometheus"]["volumes"]
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes


def exported(text: str) -> dict[str, dict[str, set[str]]]:
    """{series name: {label: values}} of a Prometheus text exposition."""
    series: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        assert m, line
        labels = series.setdefault(m.group(1), {})
        for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""):
            labels.setdefault(k, set()).add(v)
    return series


@pytest.mark.skipif(not binary_available(), reason="target/release/s3net not built")
def test_every_metric_and_label_they_read_is_exported():
    from s3net_client import Client

    for name in GPU_ONLY:
        assert name.removeprefix("s3net_") in (SERVER_SRC / "metrics.rs").read_text(), name
    down = free_port()
    server = Server(
        ["serve"],
        {
            "S3NET__WORKERS__CPU_WORKERS": "1",
            "S3NET__CLUSTER__PEERS": f"127.0.0.1:{down}",
            "S3NET__CLUSTER__ADVERTISE_ADDR": "127.0.0.1",
        },
    )
    try:
        server.wait_healthy([str(BINARY), "client", "health", "--addr", server.url])
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=30, retries=0) as c:
            # A refusal (s3net_rejected_total{reason}) and a call forwarded to the replica
            # that is down (s3net_forwarded_calls_total{method,code="Unavailable"}).
            with pytest.raises(Exception):
                c.submit(b"not an image")
            with pytest.raises(Exception):
                c.get(f"0123456789abcdef@127.0.0.1:{down}")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            series = exported(r.read().decode())
    finally:
        server.stop()
    series["up"] = {"job": {"s3net"}}

    for r in rules():
        tree = promql_parser.parse(r["expr"])
        read = selectors(tree)
        assert read, r["alert"]
        for name, matchers in read:
            if name in GPU_ONLY:
                labels = {k: None for k in GPU_ONLY[name]}
            else:
                assert name in series, f"{r['alert']}: {name} is not exported"
                labels = series[name]
            for m in matchers:
                if m.name in TARGET_LABELS and name != "up":
                    continue
                assert m.name in labels, f"{r['alert']}: {name} has no label {m.name}"
                if m.op == promql_parser.MatchOp.Equal and labels[m.name] is not None:
                    assert m.value in labels[m.name], f"{r['alert']}: {name}{{{m.name}={m.value!r}}} never appears"
                if m.op == promql_parser.MatchOp.Re and name == "s3net_rejected_total":
                    # The reasons the server counts (crates/server/src/error.rs).
                    known = (SERVER_SRC / "error.rs").read_text()
                    for reason in m.value.split("|"):
                        assert f'"{reason}"' in known, f"{r['alert']}: unknown reason {reason}"
        everything = set(TARGET_LABELS).union(*(set(l) for n, _ in read for l in [series.get(n, GPU_ONLY.get(n, {}))]))
        assert grouping_labels(tree) <= everything, r["alert"]
