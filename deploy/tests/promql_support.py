"""What the alerting rules and the Grafana dashboard read, checked against what the server
exports: PromQL parsed with promql-parser, the series of a running server's /metrics.

Shared by test_deploy_alerts.py, test_deploy_bridge_alerts.py and test_deploy_grafana.py: a
renamed metric or label fails there instead of silencing an alert or emptying a panel."""

from __future__ import annotations

import re
import urllib.request

import promql_parser
import pytest

from deploy_common import BINARY, ROOT, SERVER_SRC, Server, free_port

# Metrics only a server with a GPU registers (crates/server/src/metrics.rs), with their labels.
GPU_ONLY = {"s3net_gpu_memory_used_bytes": {"device"}, "s3net_gpu_memory_total_bytes": {"device"}}
# Metrics with series only on a server with TLS (the test server has none; crates/server/tests
# /service.rs checks them on one that has), with their labels.
TLS_ONLY = {
    "s3net_tls_certificate_expiry_timestamp_seconds": {"certificate"},
    "s3net_tls_handshakes_failed_total": {"reason"},
}
SOMETIMES = {**GPU_ONLY, **TLS_ONLY}
# Labels Prometheus adds to every scraped series, and its own `up` series.
TARGET_LABELS = {"instance", "job"}


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


def check_rule(rule: dict, name_pattern: str) -> None:
    """One alerting rule is as an operator can load it: a name matching `name_pattern`, only
    Prometheus's keys, an expression that parses, a `for` in whole units, a severity we page or
    ticket by, a summary and a description worth reading, templates reading only the alert's
    labels and value."""
    name = rule["alert"]
    assert re.fullmatch(name_pattern, name), name
    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
    promql_parser.parse(rule["expr"])  # raises on a syntax error
    if "for" in rule:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), (name, rule["for"])
    assert rule["labels"]["severity"] in {"critical", "warning"}, name
    a = rule["annotations"]
    assert a["summary"].strip() and len(a["description"].split()) >= 10, name
    for text in a.values():
        for ref in re.findall(r"\{\{(.*?)\}\}", text):
            assert re.match(r"\s*\$(labels\.\w+|value)\b", ref), (name, ref)


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


def running_server_series() -> dict[str, dict[str, set[str]]]:
    """The series a real server exports once it has refused a request, failed a call
    forwarded to a replica that is down and completed a named caller's job (so that the
    labels those read have values), plus Prometheus's own `up`. Needs target/release/s3net."""
    from s3net_client import Client

    for name in SOMETIMES:
        assert name.removeprefix("s3net_").removesuffix("_total") in (SERVER_SRC / "metrics.rs").read_text(), name
    down = free_port()
    server = Server(
        ["serve"],
        {
            "S3NET__WORKERS__CPU_WORKERS": "1",
            "S3NET__CLUSTER__PEERS": f"127.0.0.1:{down}",
            "S3NET__CLUSTER__ADVERTISE_ADDR": "127.0.0.1",
            "S3NET__SERVER__CALLERS__DASHBOARD__TOKEN": "dashboard-token",
        },
    )
    try:
        server.wait_healthy([str(BINARY), "client", "health", "--addr", server.url])
        with Client(f"127.0.0.1:{server.grpc_port}", timeout=60, retries=0, token="dashboard-token") as c:
            # A refusal (s3net_rejected_total{reason}) and a call forwarded to the replica
            # that is down (s3net_forwarded_calls_total{method,code="Unavailable"}).
            with pytest.raises(Exception):
                c.submit(b"not an image")
            with pytest.raises(Exception):
                c.get(f"0123456789abcdef@127.0.0.1:{down}")
            # A job of the caller (s3net_caller_jobs_submitted_total{caller},
            # s3net_caller_jobs_total{caller,outcome}).
            c.segment(ROOT / "tests" / "data" / "ph2" / "IMD002.png", size=32, iterations=1, features=4)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            series = exported(r.read().decode())
    finally:
        server.stop()
    series["up"] = {"job": {"s3net"}, "instance": None}
    return series


def check_reads(where: str, expr: str, series: dict[str, dict[str, set[str]]]) -> list[str]:
    """Checks that every metric, label, `=` label value and grouping label `expr` reads is
    exported (`series`); returns the metric names it reads. `where` names it in failures."""
    tree = promql_parser.parse(expr)
    read = selectors(tree)
    assert read, where
    for name, matchers in read:
        if name in SOMETIMES:
            labels = {k: None for k in SOMETIMES[name]}
        else:
            assert name in series, f"{where}: {name} is not exported"
            labels = series[name]
        for m in matchers:
            if m.name in TARGET_LABELS and name != "up":
                continue
            assert m.name in labels, f"{where}: {name} has no label {m.name}"
            if m.op == promql_parser.MatchOp.Equal and labels[m.name] is not None:
                assert m.value in labels[m.name], f"{where}: {name}{{{m.name}={m.value!r}}} never appears"
            if m.op == promql_parser.MatchOp.Re and name == "s3net_rejected_total":
                # The reasons the server counts (crates/server/src/error.rs).
                known = (SERVER_SRC / "error.rs").read_text()
                for reason in m.value.split("|"):
                    assert f'"{reason}"' in known, f"{where}: unknown reason {reason}"
    everything = set(TARGET_LABELS).union(*(set(l) for n, _ in read for l in [series.get(n, SOMETIMES.get(n, {}))]))
    assert grouping_labels(tree) <= everything, where
    return [name for name, _ in read]
