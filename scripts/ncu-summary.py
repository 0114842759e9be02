#!/usr/bin/env python3
"""Boils an Nsight Compute details report down to one line per kernel: what bounds it.

    ncu --csv --page details --section SpeedOfLight ... app > kernels.csv
    python3 scripts/ncu-summary.py kernels.csv

Why: the GPU check's kernel profile (`gpu-check.sh`'s `kernels` step) runs each of our own
kernels under ncu's sections once, on a machine lent for minutes, and the device tool brings
back only a handful of files. A kernel's bound (compute or memory throughput against peak,
occupancy, and the reasons its warps wait) is what the next change to it needs to know, and
it fits on one line; the raw CSV goes back beside it, compressed.

Launches of one kernel (the same name up to its arguments) are merged: counts and total time
add up, every other value is the median over its launches. Stall reasons are ncu's
`smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio` (warps waiting per issued
instruction, which add up to about "Warp Cycles Per Issued Instruction"), largest first.
"""
import argparse
import collections
import csv
import re
import statistics
import sys

# (section, metric name) → column label. ncu names two different metrics "Memory Throughput"
# (a percentage of peak in Speed Of Light, bytes per second in Memory Workload Analysis), so
# the section is part of the key; section names are matched by prefix, as ncu versions differ
# in the suffix ("GPU Speed Of Light Throughput").
COLUMNS = [
    ("GPU Speed Of Light", "Compute (SM) Throughput", "sm%"),
    ("GPU Speed Of Light", "Memory Throughput", "mem%"),
    ("GPU Speed Of Light", "DRAM Throughput", "dram%"),
    ("GPU Speed Of Light", "L1/TEX Cache Throughput", "l1%"),
    ("GPU Speed Of Light", "L2 Cache Throughput", "l2%"),
    ("Occupancy", "Achieved Occupancy", "occ%"),
    ("Occupancy", "Theoretical Occupancy", "theo%"),
    ("Launch Statistics", "Registers Per Thread", "regs"),
    ("Compute Workload Analysis", "Issue Slots Busy", "issue%"),
    ("Warp State Statistics", "Warp Cycles Per Issued Instruction", "cyc/inst"),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TIME_UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
              "s": 1e6, "second": 1e6}


def short_name(kernel):
    """`void (anonymous namespace)::correlate_fixed<(anonymous namespace)::Bf16, 7, 3, ...>
    (S3DepthwiseDims, ...)` → `correlate_fixed<Bf16, 7, 3, ...>`: the name and its template
    arguments, without the namespaces ncu spells two ways and without the parameter list."""
    name = kernel.replace("(anonymous namespace)::", "").replace("<unnamed>::", "")
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i].strip()
    return name.strip()


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read(path):
    """Launch ID → (kernel, {(section, metric): (value, unit)}) from ncu's details CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    try:
        head = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Name" in r)
    except StopIteration:
        sys.exit(f"{path}: no ncu details table (a header with 'Kernel Name' and 'Metric Name')")
    h = rows[head]
    # "ID" (the launch) and "Section Name" are read where this ncu writes them: without an ID
    # a launch ends where its kernel's name changes or one of its metrics comes again.
    col = {name: h.index(name) for name in h if name in ("ID", "Kernel Name", "Section Name",
                                                         "Metric Name", "Metric Unit", "Metric Value")}
    need = ("Kernel Name", "Metric Name", "Metric Value")
    if any(n not in col for n in need):
        sys.exit(f"{path}: the details table lacks {[n for n in need if n not in col]}")
    field = lambda r, name: r[col[name]] if name in col else ""
    launches = collections.OrderedDict()
    current = None
    for r in rows[head + 1:]:
        if len(r) <= max(col.values()):
            continue
        value = number(r[col["Metric Value"]])
        if value is None:
            continue
        kernel = r[col["Kernel Name"]]
        key = (field(r, "Section Name"), r[col["Metric Name"]])
        if "ID" in col:
            launch = r[col["ID"]]
        elif current is None or launches[current][0] != kernel or key in launches[current][1]:
            launch = len(launches)
        else:
            launch = current
        current = launch
        _, metrics = launches.setdefault(launch, (kernel, {}))
        metrics[key] = (value, field(r, "Metric Unit"))
    return launches


def lookup(metrics, section, name):
    for (s, n), v in metrics.items():
        if n == name and s.startswith(section):
            return v
    return None


def duration_us(metrics):
    v = lookup(metrics, "GPU Speed Of Light", "Duration")
    if v is None:
        v = next((m for (s, n), m in metrics.items() if n == "gpu__time_duration.sum"), None)
    if v is None:
        return None
    return v[0] * TIME_UNITS.get(v[1].lower(), 1.0)


def summarize(launches, stalls=4):
    kernels = collections.OrderedDict()
    for kernel, metrics in launches.values():
        kernels.setdefault(short_name(kernel), []).append(metrics)
    out = []
    for name, runs in kernels.items():
        times = [t for t in (duration_us(m) for m in runs) if t is not None]
        row = {"kernel": name, "n": len(runs), "total_us": sum(times),
               "median_us": statistics.median(times) if times else None}
        for section, metric, label in COLUMNS:
            vals = [v[0] for v in (lookup(m, section, metric) for m in runs) if v is not None]
            row[label] = statistics.median(vals) if vals else None
        reasons = collections.defaultdict(list)
        for m in runs:
            for (_, n), (v, _) in m.items():
                hit = STALL.match(n)
                if hit:
                    reasons[hit.group(1)].append(v)
        med = {r: statistics.median(v) for r, v in reasons.items()}
        row["stalls"] = sorted(med.items(), key=lambda kv: -kv[1])[:stalls]
        out.append(row)
    out.sort(key=lambda r: -r["total_us"])
    return out


def render(rows):
    labels = [c[2] for c in COLUMNS]
    total = sum(r["total_us"] for r in rows)
    lines = [f"# {sum(r['n'] for r in rows)} launches of {len(rows)} kernels, "
             f"{total / 1e3:.2f} ms; medians per launch; % of peak; stalls: warps waiting per "
             "issued instruction"]
    lines.append("  ".join(["share", "total_us", "med_us", "n"] + labels + ["stalls", "kernel"]))
    fmt = lambda v: "-" if v is None else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}")
    for r in rows:
        share = 100 * r["total_us"] / total if total else 0.0
        stalls = ",".join(f"{k}={v:.2f}" for k, v in r["stalls"]) or "-"
        cells = [f"{share:5.1f}%", f"{r['total_us']:8.0f}", fmt(r["median_us"]), str(r["n"])]
        cells += [fmt(r[l]) for l in labels] + [stalls, r["kernel"][:110]]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="ncu --csv --page details output")
    ap.add_argument("--stalls", type=int, default=4, help="stall reasons shown per kernel")
    args = ap.parse_args()
    print(render(summarize(read(args.csv), args.stalls)))


if __name__ == "__main__":
    main()
