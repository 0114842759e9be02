#!/usr/bin/env python3
"""Image-by-image Dice differences between pairs of `s3net eval --report` files.

Usage: tools/paired_dsc.py BEFORE.json AFTER.json [BEFORE2.json AFTER2.json ...]

For each protocol (auto and oracle at full resolution, paper on the grid) prints the mean of
AFTER − BEFORE over every image of every pair, its standard error, and how many images got
better or worse by more than 0.05 points: the numbers the README quotes as "± … image by image".
"""
import json
import statistics
import sys


def images(path):
    with open(path) as f:
        return {i["name"]: i for i in json.load(f)["images"]}


def main(paths):
    if len(paths) < 2 or len(paths) % 2:
        sys.exit(__doc__)
    for metric, level in (("auto", "full"), ("oracle", "full"), ("paper", "grid")):
        diffs = []
        for before, after in zip(paths[0::2], paths[1::2]):
            a, b = images(before), images(after)
            missing = sorted(set(a) ^ set(b))
            if missing:
                sys.exit(f"{before} and {after} differ in their images: {missing[:5]}")
            diffs += [b[k][level][metric]["dsc"] - a[k][level][metric]["dsc"] for k in a]
        n = len(diffs)
        se = statistics.stdev(diffs) / n**0.5 if n > 1 else float("nan")
        better, worse = sum(d > 0.05 for d in diffs), sum(d < -0.05 for d in diffs)
        print(f"{metric}: {statistics.mean(diffs):+.2f} ± {se:.2f} image by image (n = {n}), {better} better, {worse} worse")


if __name__ == "__main__":
    main(sys.argv[1:])
