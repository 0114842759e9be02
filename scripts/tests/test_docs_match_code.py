"""The documentation against the code. Every setting of the server's configuration (the serde
fields of `crates/server/src/config.rs`) has its row in the README's configuration table and a
line in `crates/server/config.example.toml` (set, or commented out where it has no default), and
every metric `crates/server/src/metrics.rs` registers has its row in the README's metrics table:
a key or metric added without its documentation fails here, as does a documented one the code no
longer has."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Where each struct's fields live in the file; callers are a table of names.
SECTIONS = {
    "ServerConfig": "server",
    "TlsConfig": "server.tls",
    "CallerConfig": "server.callers.NAME",
    "QueueConfig": "queue",
    "WorkersConfig": "workers",
    "DefaultsConfig": "defaults",
    "LogConfig": "log",
    "MetricsConfig": "metrics",
    "TelemetryConfig": "telemetry",
    "ClusterConfig": "cluster",
}
# Fields that hold another section, not a setting.
NESTED = {"server.tls", "server.callers"}


def struct_keys() -> set:
    text = (ROOT / "crates/server/src/config.rs").read_text()
    keys = set()
    for name, section in SECTIONS.items():
        body = re.search(rf"pub struct {name} \{{\n(.*?)\n\}}", text, flags=re.S).group(1)
        skip = False
        for line in body.split("\n"):
            line = line.strip()
            if line.startswith("#[serde(skip"):
                skip = True
            m = re.match(r"pub (\w+):", line)
            if m:
                key = f"{section}.{m.group(1)}"
                if not skip and key not in NESTED:
                    keys.add(key)
                skip = False
    return keys


def readme_keys() -> set:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("\n### Configuration\n") : text.index("\n### Observability\n")]
    keys = set()
    for cell in re.findall(r"^\| (`[^|]*`) \|", table, flags=re.M):
        names = re.findall(r"`([^`]+)`", cell)
        base = names[0].rsplit(".", 1)[0]
        keys.add(names[0])
        keys.update(base + n if n.startswith(".") else n for n in names[1:])
    return keys


def example_keys() -> set:
    keys, section = set(), ""
    for line in (ROOT / "crates/server/config.example.toml").read_text().split("\n"):
        line = line.lstrip("# ").rstrip()
        if m := re.match(r"^\[([\w.]+)\]$", line):
            section = re.sub(r"^server\.callers\.\w+$", "server.callers.NAME", m.group(1))
        elif m := re.match(r"^(\w+) = ", line):
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_every_setting_is_in_the_readme_table():
    fields, documented = struct_keys(), readme_keys()
    assert fields - documented == set(), "settings without a README row"
    assert documented - fields == set(), "README rows for settings the struct does not have"


def test_every_setting_is_in_the_example_file():
    fields, example = struct_keys(), example_keys()
    assert fields - example == set(), "settings missing from config.example.toml"
    assert example - fields == set(), "config.example.toml keys the struct does not have"


def test_every_metric_is_in_the_readme_table():
    source = (ROOT / "crates/server/src/metrics.rs").read_text()
    registered = {"s3net_" + n for n in re.findall(r'registry\.register\(\s*"(\w+)"', source)}
    rows = re.findall(r"^\| (`s3net_[^|]*)\|", (ROOT / "README.md").read_text(), flags=re.M)
    documented = {re.sub(r"\{.*", "", n) for r in rows for n in re.findall(r"`(s3net_[^`]+)`", r)}
    # A counter is exported with `_total`, registered without it.
    documented = {n.removesuffix("_total") for n in documented}
    assert len(registered) > 30
    assert registered - documented == set(), "metrics without a README row"
    assert documented - registered == set(), "README rows for metrics the server does not register"
