#!/usr/bin/env python3
"""Adds up the batched fits of `gpu-check.sh`'s `ab` step (bench-ab.txt): per binary, number
format and batch size, the median images per second over the rounds and its ratio to this
build's (`./s3net`), fastest first. Why: the step runs several binaries (the bundle's switch
wrappers among them) alternately on one card, and the decision it serves — which waiting kernel
to switch on by default — needs their ratios in one table, not twelve JSON objects.

    python3 scripts/ab-summary.py bench-ab.txt
"""
import json
import re
import statistics
import sys
from collections import defaultdict


def parse(text):
    """(binary, precision, batch) -> [images per second, one per round]; failed runs skipped."""
    runs = defaultdict(list)
    blocks = re.split(r"^### ab round \d+ ", text, flags=re.M)[1:]
    for block in blocks:
        head, _, rest = block.partition("\n")
        precision, _, binary = head.strip().partition(" ")
        body = rest[: rest.rfind("}") + 1]
        try:
            report = json.loads(body[body.find("{"):])
        except ValueError:
            continue
        for b in report.get("batched", []):
            runs[(binary, precision, b["batch"])].append(b["images_per_second"])
    return runs


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    runs = parse(open(sys.argv[1]).read())
    if not runs:
        sys.exit(f"no batched fits in {sys.argv[1]}")
    keys = sorted({(p, n) for (_, p, n) in runs})
    for precision, batch in keys:
        rows = {b: statistics.median(v) for (b, p, n), v in runs.items() if (p, n) == (precision, batch)}
        base = rows.get("./s3net")
        print(f"{precision}, {batch} per batch: images/s (median of rounds), ratio to ./s3net")
        for binary, ips in sorted(rows.items(), key=lambda kv: -kv[1]):
            ratio = f"{ips / base:.3f}" if base else "-"
            print(f"  {binary:28} {ips:7.2f}  {ratio}")


if __name__ == "__main__":
    main()
