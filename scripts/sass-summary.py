#!/usr/bin/env python3
"""What our CUDA kernels compile to, without a GPU: one line per kernel.

    nvcc ... -Xptxas -v -c x.cu -o x.o 2> ptxas.log && cuobjdump -sass x.o > x.sass
    python3 scripts/sass-summary.py ptxas.log x.sass [more pairs ...]

(`make sass` runs it over every csrc/*_cuda.cu.) Why: most sessions that work on the kernels
have no GPU, and a lent one is there for minutes. What the compiler made of a kernel can be
read here: registers per thread (which cap how many threads an SM holds), bytes spilled to
local memory, and the static instruction mix — the share of fused multiply-adds among all
instructions, and the shared- and global-memory loads and stores beside them. It says nothing
of time: an instruction in a loop counts once, and what a kernel waits on takes ncu on a GPU
(`gpu-check.sh`'s `kernels` step, `scripts/ncu-summary.py`). It answers "did that change
what the compiler emits?" before a GPU is there to answer "did it get faster?".
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")

# Opcode families counted apart (the first part of the opcode, before any '.').
FAMILIES = {
    "FFMA": "ffma", "FMUL": "fmul", "FADD": "fadd", "HFMA2": "hfma2", "HMMA": "hmma",
    "LDS": "lds", "STS": "sts", "LDG": "ldg", "STG": "stg", "BAR": "bar",
    "RED": "atom", "REDG": "atom", "REDAS": "atom", "ATOM": "atom", "ATOMG": "atom", "ATOMS": "atom",
}
COLUMNS = ["regs", "spill", "instr", "ffma", "ffma%", "fmul+fadd", "lds", "sts", "ldg", "stg", "atom", "bar"]


def parse_ptxas(text: str) -> dict:
    """Kernel (mangled) → {"regs", "spill"} from `-Xptxas -v` output; the last architecture
    named wins, so pass one architecture's log."""
    out: dict = {}
    current = None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"regs": 0, "spill": 0}
            continue
        if current is None:
            continue
        m = SPILLS.search(line)
        if m:
            out[current]["spill"] = int(m.group(2)) + int(m.group(3))
        m = USED.search(line)
        if m:
            out[current]["regs"] = int(m.group(1))
    return out


def parse_sass(text: str) -> dict:
    """Kernel (mangled) → opcode family counts (and "instr", every instruction) from a
    `cuobjdump -sass` listing."""
    out: dict = {}
    marks = list(FUNCTION.finditer(text))
    for i, m in enumerate(marks):
        body = text[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        counts = collections.Counter()
        for op in INSTRUCTION.findall(body):
            counts["instr"] += 1
            family = FAMILIES.get(op.split(".")[0])
            if family:
                counts[family] += 1
        out[m.group(1)] = counts
    return out


def demangle(names: list) -> dict:
    """Mangled → readable names (c++filt when it is there), the anonymous namespace dropped."""
    readable = dict(zip(names, names))
    if names and shutil.which("c++filt"):
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if r.returncode == 0:
            readable = dict(zip(names, r.stdout.splitlines()))
    return {k: re.sub(r"\(anonymous namespace\)::", "", v) for k, v in readable.items()}


def rows(ptxas: dict, sass: dict, source: str = "") -> list:
    """One row per kernel that either listing names, `source: kernel` first: its columns as text."""
    names = sorted(set(ptxas) | set(sass))
    readable = demangle(names)
    out = []
    for n in names:
        p, c = ptxas.get(n, {}), sass.get(n, collections.Counter())
        instr = c["instr"]
        share = f"{100 * c['ffma'] / instr:.0f}" if instr else "-"
        out.append([f"{source}: {readable[n]}" if source else readable[n], str(p.get("regs", "-")), str(p.get("spill", "-")), str(instr), str(c["ffma"]), share,
                    str(c["fmul"] + c["fadd"]), str(c["lds"]), str(c["sts"]), str(c["ldg"]), str(c["stg"]), str(c["atom"]), str(c["bar"])])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="pairs: a ptxas -v log, then its object's cuobjdump -sass listing")
    ap.add_argument("--match", default="", help="only kernels whose source or readable name contains this (any case)")
    a = ap.parse_args()
    if len(a.files) % 2:
        ap.error("give the files in pairs: ptxas log, SASS listing")
    table = []
    for log, listing in zip(a.files[::2], a.files[1::2]):
        source = os.path.splitext(os.path.basename(listing))[0]
        with open(log) as f, open(listing) as g:
            found = rows(parse_ptxas(f.read()), parse_sass(g.read()), source)
        table += [r for r in found if a.match.lower() in r[0].lower()]
    print("| kernel | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for r in table:
        print("| `" + r[0] + "` | " + " | ".join(r[1:]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
