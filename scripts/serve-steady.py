#!/usr/bin/env python3
"""The server's steady rate from its log: jobs completed per second between the completions at
10 % and 90 % of a run, and the mean steps a job took. Why: the GPU check's server run posts
every job at once, and its wall-time rate (jobs / seconds from the first post to the last
result) counts the first stacks' 50 steps before any job ends, the last stacks' draining and
the 160 client processes starting; the middle of the run is what a busy server sustains.

    python3 scripts/serve-steady.py serve-log.txt
"""
import re
import sys
from datetime import datetime

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s+INFO\b")
# " iterations=" with its space: the job's span also says "max_iterations=".
STEPS = re.compile(r"\siterations=(\d+)")


def completions(lines):
    """(seconds since the epoch, steps) of each completed job, in log order."""
    out = []
    for line in lines:
        m = STAMP.match(line)
        if not m or "job completed" not in line:
            continue
        steps = STEPS.search(line)
        out.append((datetime.fromisoformat(m.group(1)).timestamp(), int(steps.group(1)) if steps else None))
    return out


def steady(done):
    """(jobs per second between the 10 % and 90 % completions, mean steps), or None for under
    ten completions (too few for a middle)."""
    if len(done) < 10:
        return None
    times = sorted(t for t, _ in done)
    a, b = len(times) // 10, len(times) - 1 - len(times) // 10
    if times[b] <= times[a]:
        return None
    steps = [s for _, s in done if s is not None]
    return (b - a) / (times[b] - times[a]), (sum(steps) / len(steps) if steps else None)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], errors="replace") as f:
        done = completions(f)
    r = steady(done)
    if r is None:
        print(f"steady: too few completed jobs ({len(done)})")
        return
    rate, steps = r
    print(f"steady_images_per_s {rate:.2f} (completions 10-90 % of {len(done)}), mean_steps {steps:.1f}" if steps is not None else f"steady_images_per_s {rate:.2f}")


if __name__ == "__main__":
    main()
