"""scripts/sass-summary.py: ptxas's and cuobjdump's listings read into one line per kernel."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "sass-summary.py"
spec = importlib.util.spec_from_file_location("sass_summary", SCRIPT)
sass_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_summary)

# The shapes of nvcc 13.0's `-Xptxas -v` output and cuobjdump 13.5's SASS (abridged).
PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN12_GLOBAL__N_19correlateIfEEvPKfPf' for 'sm_90'
ptxas info    : Function properties for _ZN12_GLOBAL__N_19correlateIfEEvPKfPf
    16 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6col2imPf' for 'sm_90'
ptxas info    : Function properties for _Z6col2imPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers
"""
SASS = """
Fatbin elf code:
================
arch = sm_90

\tcode for sm_90
\t\tFunction : _ZN12_GLOBAL__N_19correlateIfEEvPKfPf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                        /* 0x00000a00ff017b82 */
                                                                                 /* 0x000fe40000000800 */
        /*0010*/                   LDG.E.CONSTANT R9, desc[UR30][R6.64+0x30] ;   /* 0x0000301e06097981 */
        /*0020*/              @!P1 STS [R16], R21 ;                              /* 0x0000001510009388 */
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                 /* 0x0000000000007b1d */
        /*0040*/                   LDS.128 R12, [R3+0x10] ;                      /* 0x000010000300c984 */
        /*0050*/                   FFMA R0, R12, UR46, R0 ;                      /* 0x0000002e0c007c23 */
        /*0060*/                   FFMA R4, R13, UR46, R4 ;                      /* 0x0000002e0d047c23 */
        /*0070*/               @P0 STG.E desc[UR4][R2.64], R0 ;                  /* 0x0000000002000986 */
        /*0080*/                   EXIT ;                                        /* 0x000000000000794d */
\t\t..........

\t\tFunction : _Z6col2imPf
        /*0000*/                   FMUL R2, R2, R3 ;                             /* 0x0000000302027220 */
        /*0010*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R4.64], R2 ;  /* 0x000000020400798e */
        /*0020*/                   EXIT ;                                        /* 0x000000000000794d */
"""


def test_registers_spills_and_the_instruction_mix_per_kernel():
    p, s = sass_summary.parse_ptxas(PTXAS), sass_summary.parse_sass(SASS)
    assert p == {
        "_ZN12_GLOBAL__N_19correlateIfEEvPKfPf": {"regs": 128, "spill": 44},
        "_Z6col2imPf": {"regs": 64, "spill": 0},
    }
    c = s["_ZN12_GLOBAL__N_19correlateIfEEvPKfPf"]
    assert (c["instr"], c["ffma"], c["ldg"], c["sts"], c["lds"], c["bar"], c["stg"]) == (9, 2, 1, 1, 1, 1, 1)
    assert (s["_Z6col2imPf"]["atom"], s["_Z6col2imPf"]["fmul"]) == (1, 1)
    rows = {r[0]: r[1:] for r in sass_summary.rows(p, s, "deform_cuda")}
    assert rows["deform_cuda: col2im(float*)"][:5] == ["64", "0", "3", "0", "0"]
    corr = rows["deform_cuda: void correlate<float>(float const*, float*)"]
    assert corr[:5] == ["128", "44", "9", "2", "22"], "the anonymous namespace is dropped"


def test_the_command_pairs_its_files_and_filters(tmp_path):
    (tmp_path / "x.ptxas").write_text(PTXAS)
    (tmp_path / "x_cuda.sass").write_text(SASS)
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), *a], capture_output=True, text=True)
    out = run("--match", "COL2IM", str(tmp_path / "x.ptxas"), str(tmp_path / "x_cuda.sass"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("| kernel | regs | spill | instr | ffma |") and len(lines) == 3, out.stdout
    assert lines[2].startswith("| `x_cuda: col2im(float*)` | 64 | 0 |"), lines[2]
    assert run(str(tmp_path / "x.ptxas")).returncode == 2, "files come in pairs"
