#!/usr/bin/env python3
"""Times a 1×1 convolution of a 1×C×256² channels-last map to 32 channels on the CPU, forward
and forward+backward (input, weight and bias gradients): libtorch's conv2d (oneDNN) against the
same maps as plain GEMMs on the channels-last layout (y = X·Wᵀ + b, gW = Gᵀ·X, gX = G·W). Why:
the 1×1 convs are about 40 % of a CPU fit step, and a GEMM is the obvious alternative; this
says whether it pays before any Rust is written. Runs interleaved, medians and minima of 40.

    ~/.cache/s3net/torch-2.11.0/bin/python scripts/pointwise-cpu.py
"""
import time

import torch


def main():
    torch.manual_seed(0)
    for cin in (32, 96):
        cl = torch.channels_last
        x = torch.randn(1, cin, 256, 256).to(memory_format=cl).requires_grad_(True)
        w = torch.randn(32, cin, 1, 1).to(memory_format=cl).requires_grad_(True)
        b = torch.randn(32, requires_grad=True)
        g = torch.randn(1, 32, 256, 256).to(memory_format=cl)
        X, W = x.detach().permute(0, 2, 3, 1).reshape(-1, cin), w.detach().view(32, cin)
        G = g.permute(0, 2, 3, 1).reshape(-1, 32)

        def conv_fb():
            torch.autograd.grad(torch.nn.functional.conv2d(x, w, b), (x, w, b), g)

        def gemm_fb():
            torch.addmm(b.detach(), X, W.t()), G.t() @ X, G @ W, G.sum(0)

        def conv_f():
            with torch.no_grad():
                torch.nn.functional.conv2d(x, w, b)

        def gemm_f():
            torch.addmm(b.detach(), X, W.t())

        runs = {"conv2d fwd+bwd": conv_fb, "GEMMs fwd+bwd": gemm_fb, "conv2d fwd": conv_f, "GEMM fwd": gemm_f}
        times = {n: [] for n in runs}
        for f in runs.values():
            f()
        for _ in range(40):
            for n, f in runs.items():
                t = time.perf_counter()
                f()
                times[n].append((time.perf_counter() - t) * 1e3)
        cells = [f"{n} {sorted(v)[len(v) // 2]:.2f} (min {min(v):.2f})" for n, v in times.items()]
        print(f"{cin} → 32 channels, ms median (min): " + ", ".join(cells))


if __name__ == "__main__":
    main()
