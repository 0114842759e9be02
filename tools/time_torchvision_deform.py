"""Times torchvision.ops.deform_conv2d on the shape `s3net bench deform` uses, so the ratio is
measured in one run on one machine. Prints one JSON object like the Rust bench.

    python tools/time_torchvision_deform.py --size 256 --channels 64 --repeats 3
"""
import argparse
import json
import statistics
import time

import torch
from torchvision.ops import deform_conv2d

ap = argparse.ArgumentParser()
ap.add_argument("--size", type=int, default=256)
ap.add_argument("--channels", type=int, default=64)
ap.add_argument("--repeats", type=int, default=3)
ap.add_argument("--threads", type=int, default=torch.get_num_threads())
a = ap.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)
c, s = a.channels, a.size
x = torch.randn(1, c, s, s, requires_grad=True)
off = (torch.randn(1, 18, s, s) * 2).requires_grad_()
mask = torch.rand(1, 9, s, s, requires_grad=True)
w = (torch.randn(c, c, 3, 3) * 0.05).requires_grad_()
b = torch.zeros(c, requires_grad=True)
fwd, fb = [], []
for rep in range(a.repeats + 1):
    t0 = time.perf_counter()
    with torch.no_grad():
        deform_conv2d(x, off, w, b, padding=1, mask=mask)
    tf = (time.perf_counter() - t0) * 1e3
    t1 = time.perf_counter()
    deform_conv2d(x, off, w, b, padding=1, mask=mask).sum().backward()
    tfb = (time.perf_counter() - t1) * 1e3
    if rep > 0:
        fwd.append(tf)
        fb.append(tfb)
print(json.dumps({"torchvision": {"forward_ms": statistics.median(fwd), "forward_backward_ms": statistics.median(fb)},
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "shape": [1, c, s, s]}))
