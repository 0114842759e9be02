"""scripts/serve-steady.py reads the server's log as `s3net serve` writes it: the GPU check's
server run comes back as that log, from a lent machine where nobody can rerun it."""
import importlib.util
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "serve-steady.py"
spec = importlib.util.spec_from_file_location("serve_steady", SCRIPT)
steady = importlib.util.module_from_spec(spec)
spec.loader.exec_module(steady)

# Two lines of a real log (H200, 2026-11-30), shortened; the job's span says max_iterations too.
DONE = (
    '2026-11-30T00:31:{s:09.6f}Z  INFO job{{job_id=ee92d991355b7ce4 worker=cuda:0-1 device=cuda:0 '
    'preset=default size=256 max_iterations=50 priority=0 queued_s=0.52 batch_jobs=16 '
    'iterations={it} labels=3 fit_s=2.58 outcome="completed"}}: s3net_server::worker: job completed '
    'labels=3 fit_s=2.58'
)
OTHER = (
    '2026-11-30T00:30:58.000000Z  INFO job{job_id=1 worker=cuda:0-0 max_iterations=50 '
    'batch_jobs=1}: s3net_server::worker: job started'
)


def log(times, its=18):
    return [OTHER] + [DONE.format(s=t, it=its) for t in times]


def test_the_middle_of_the_run_sets_the_rate():
    # A slow start (the first stacks' 50 steps), 20 jobs a second in the middle, a slow end.
    times = [1.0, 2.0] + [5.0 + i * 0.05 for i in range(16)] + [9.0, 12.0]
    done = steady.completions(log(times))
    assert len(done) == 20
    rate, steps = steady.steady(done)
    # The 10 % and 90 % completions are the 3rd and the 18th: 15 jobs in 0.75 s.
    assert abs(rate - 20.0) < 1e-6
    assert steps == 18


def test_steps_are_the_job_s_own_not_its_budget():
    done = steady.completions(log([1.0 + i for i in range(10)], its=37))
    assert {s for _, s in done} == {37}


def test_too_few_jobs_say_so():
    assert steady.steady(steady.completions(log([1.0, 2.0, 3.0]))) is None
    out = subprocess.run([sys.executable, str(SCRIPT), "/dev/null"], capture_output=True, text=True)
    assert out.returncode == 0 and "too few" in out.stdout
