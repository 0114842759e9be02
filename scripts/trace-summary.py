#!/usr/bin/env python3
"""Adds up an operator-level trace (`s3net bench fit --trace FILE`, a Kineto Chrome trace) per op.

On a GPU: every CUDA kernel's time is charged to the op that launched it (the trace links them
by "External id": an aten op, or one of ours, `s3net::…`, whose scope the ops' C entry points open), grouped by
that op, its input shapes and types, and the autograd node it ran in (its backward, or
"forward"). On the CPU (no kernels in the trace): each op's self
time (its duration less its children's), grouped the same way. Prints the top groups, then the
kernels of the top ones: what a per-kernel profile (ncu) cannot say is which op asked for a
copy or an add.

    python3 scripts/trace-summary.py TRACE.json [--top 40]
"""
import argparse
import collections
import json
import re


def short(name):
    """An autograd node's name without the C++ wrapper around our own functions (in namespace
    s3ops since 2026-11-29; earlier traces have them at the top level)."""
    wrapper = re.match(r"torch::autograd::CppNode<(?:s3ops::)?\(anonymous namespace\)::(.*)>$", name)
    return wrapper.group(1) if wrapper else name


def shapes(args):
    dims = args.get("Input Dims") or []
    types = args.get("Input type") or []
    parts = []
    for d, t in zip(dims, types):
        if d:
            parts.append(f"{t}{list(d)}")
    return " ".join(parts)[:110]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]

    # Per thread, each op's enclosing autograd node and its children's total time.
    node_of, child_time = {}, collections.Counter()
    by_tid = collections.defaultdict(list)
    for e in ops:
        by_tid[e["tid"]].append(e)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                child_time[id(stack[-1])] += e["dur"]
            node = next((short(s["name"].split(": ", 1)[-1]) for s in reversed(stack)
                         if s["name"].startswith("autograd::engine::evaluate_function")), "forward")
            node_of[id(e)] = node
            stack.append(e)
    by_ext = {e["args"].get("External id"): e for e in ops if "args" in e}

    groups, counts, members = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    if kernels:
        what = "GPU time of the kernels each op launched"
        for k in kernels:
            op = by_ext.get(k.get("args", {}).get("External id"))
            key = (short(op["name"]), shapes(op.get("args", {})), node_of[id(op)]) if op else ("(no op)", "", "")
            groups[key] += k["dur"]
            counts[key] += 1
            members[key][k["name"][:90]] += k["dur"]
    else:
        what = "CPU self time of each op"
        for e in ops:
            if e["name"].startswith("autograd::engine"):
                continue
            key = (short(e["name"]), shapes(e.get("args", {})), node_of[id(e)])
            groups[key] += e["dur"] - child_time[id(e)]
            counts[key] += 1
    total = sum(groups.values()) or 1.0
    print(f"# {what}: {total / 1e3:.1f} ms in {sum(counts.values())} events ({a.trace})")
    for key, us in groups.most_common(a.top):
        name, shp, node = key
        print(f"{us / total * 100:5.1f}% {us:9.0f} us  n={counts[key]:4d}  {name}  [{node}]  {shp}")
    if kernels:
        print("\n# kernels of the top 10")
        for key, _ in groups.most_common(10):
            print(f"{key[0]} [{key[2]}]:")
            for kn, us in members[key].most_common(3):
                print(f"    {us:9.0f} us  {kn}")


if __name__ == "__main__":
    main()
