"""scripts/ncu-summary.py on a details report shaped like ncu's (`--csv --page details`):
the GPU check's kernel profile comes back only as this summary and the compressed CSV, and it
runs on a lent machine for minutes, so its parsing is checked here, where there is no GPU."""
import csv
import importlib.util
import io
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "ncu-summary.py"
spec = importlib.util.spec_from_file_location("ncu_summary", SCRIPT)
ncu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ncu)

CORRELATE = ("void (anonymous namespace)::correlate_fixed<(anonymous namespace)::Bf16, 7, 3, false, "
             "float>(S3DepthwiseDims, const T1 *, const T1 *, const T1 *, T1 *)")
IM2COL = "void <unnamed>::im2col_kernel<<unnamed>::Bf16, float>(S3DeformDims, const T1 *, const T2 *)"
HEADER = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
          "Block Size", "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit",
          "Metric Value"]


def launch(i, kernel, duration, unit, sm, mem, stalls):
    rows = [
        ("GPU Speed Of Light Throughput", "Duration", unit, duration),
        ("GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", sm),
        ("GPU Speed Of Light Throughput", "Memory Throughput", "%", mem),
        ("Memory Workload Analysis", "Memory Throughput", "Gbyte/s", "1,234.5"),
        ("Occupancy", "Achieved Occupancy", "%", "61.2"),
        ("Launch Statistics", "Registers Per Thread", "register/thread", "38"),
        ("Launch Statistics", "Block Size", "", "(16, 16, 1)"),
    ]
    rows += [("Command line profiler metrics",
              f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio", "", v)
             for r, v in stalls.items()]
    return [[str(i), "4242", "s3net", "127.0.0.1", kernel, "1", "7", "(256, 1, 1)", "(8192, 1, 1)",
             "0", "9.0", *r] for r in rows]


def report(tmp_path, drop=()):
    """The report, less the columns named in `drop` (an ncu that writes fewer)."""
    buf = io.StringIO()
    buf.write("==PROF== Connected to process 4242 (/tmp/.gpu/s3net)\n")
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    keep = [i for i, name in enumerate(HEADER) if name not in drop]
    w.writerow([HEADER[i] for i in keep])
    stalls = {"barrier": 0.4, "long_scoreboard": 2.5, "mio_throttle": 1.5, "short_scoreboard": 0.9,
              "math_pipe_throttle": 0.1}
    for rows in [launch(0, CORRELATE, "430.5", "usecond", "41.0", "20.0", stalls),
                 launch(1, IM2COL, "1.2", "msecond", "12.0", "88.0", {"lg_throttle": 3.0}),
                 launch(2, CORRELATE, "431.5", "usecond", "43.0", "22.0", stalls),
                 launch(3, CORRELATE, "1,100.0", "usecond", "45.0", "24.0", stalls)]:
        w.writerows([[row[i] for i in keep] for row in rows])
    path = tmp_path / "kernels.csv"
    path.write_text(buf.getvalue())
    return path


def test_short_names_drop_namespaces_and_parameters():
    assert ncu.short_name(CORRELATE) == "correlate_fixed<Bf16, 7, 3, false, float>"
    assert ncu.short_name(IM2COL) == "im2col_kernel<Bf16, float>"
    assert ncu.short_name("nvjet_sm90_tst_384x32_64x4_2x1_v_bz_NNT") == "nvjet_sm90_tst_384x32_64x4_2x1_v_bz_NNT"


def test_launches_of_a_kernel_merge_into_medians_largest_total_first(tmp_path):
    rows = ncu.summarize(ncu.read(report(tmp_path)))
    assert [r["kernel"] for r in rows] == ["correlate_fixed<Bf16, 7, 3, false, float>", "im2col_kernel<Bf16, float>"]
    c, i = rows
    assert c["n"] == 3 and abs(c["total_us"] - 1962.0) < 1e-9 and c["median_us"] == 431.5
    assert c["sm%"] == 43.0 and c["mem%"] == 22.0, "Speed Of Light's percentage, not the bytes per second"
    assert c["occ%"] == 61.2 and c["regs"] == 38.0 and c["dram%"] is None
    assert [k for k, _ in c["stalls"]] == ["long_scoreboard", "mio_throttle", "short_scoreboard", "barrier"]
    assert i["n"] == 1 and i["total_us"] == 1200.0, "milliseconds read as such"
    assert i["stalls"] == [("lg_throttle", 3.0)]


def test_command_line_prints_one_line_per_kernel(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(report(tmp_path))], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out[0].startswith("# 4 launches of 2 kernels, 3.16 ms")
    assert "stalls" in out[1] and len(out) == 4
    assert out[2].split()[0] == "62.0%" and "long_scoreboard=2.50,mio_throttle=1.50" in out[2]
    assert out[3].endswith("im2col_kernel<Bf16, float>")


def test_a_file_without_the_table_says_so(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("==ERROR== Profiling failed\n")
    r = subprocess.run([sys.executable, str(SCRIPT), str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "no ncu details table" in r.stderr


def test_without_launch_ids_launches_split_where_a_metric_comes_again(tmp_path):
    rows = ncu.summarize(ncu.read(report(tmp_path, drop=("ID",))))
    assert [(r["kernel"], r["n"]) for r in rows] == [("correlate_fixed<Bf16, 7, 3, false, float>", 3),
                                                     ("im2col_kernel<Bf16, float>", 1)]
    assert rows[0]["median_us"] == 431.5


def test_a_table_without_metric_values_says_what_it_lacks(tmp_path):
    p = report(tmp_path, drop=("Metric Value",))
    r = subprocess.run([sys.executable, str(SCRIPT), str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "lacks ['Metric Value']" in r.stderr
