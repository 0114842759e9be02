"""Golden values for s3net's deform_conv2d, produced by torchvision.ops.deform_conv2d.

Run with the cached torch venv (torchvision==0.26.0 matches torch 2.11.0):
    $HOME/.cache/s3net/torch-2.11.0/bin/pip install torchvision==0.26.0 numpy
    $HOME/.cache/s3net/torch-2.11.0/bin/python tools/make_deform_golden.py
Writes crates/model/tests/data/deform_golden.json: inputs, outputs and the gradients of
sum(out * g) w.r.t. input, offset, mask, weight and bias, in float64.
"""
import json
import pathlib

import torch
from torchvision.ops import deform_conv2d

torch.manual_seed(20231002)
cases = [
    # name, N, C, H, W, O, kh, kw, stride, padding, dilation, offset scale, with mask, with bias
    ("basic_3x3", 1, 2, 5, 6, 3, 3, 3, (1, 1), (1, 1), (1, 1), 1.5, True, True),
    ("stride2_pad0", 2, 3, 7, 7, 2, 3, 3, (2, 2), (0, 0), (1, 1), 1.0, True, True),
    ("dilated_rect", 1, 2, 8, 6, 2, 3, 2, (1, 2), (2, 1), (2, 1), 2.0, True, False),
    ("leaves_image", 1, 1, 4, 4, 2, 3, 3, (1, 1), (1, 1), (1, 1), 6.0, True, True),
    ("no_mask_5x5", 1, 2, 6, 5, 2, 5, 5, (1, 1), (2, 2), (1, 1), 1.0, False, True),
    ("one_row", 1, 2, 1, 5, 2, 1, 3, (1, 1), (0, 1), (1, 1), 0.7, True, True),
]
out = []
for name, n, c, h, w, o, kh, kw, stride, padding, dilation, scale, with_mask, with_bias in cases:
    ho = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    x = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    off = (torch.randn(n, 2 * kh * kw, ho, wo, dtype=torch.float64) * scale).requires_grad_()
    mask = torch.rand(n, kh * kw, ho, wo, dtype=torch.float64, requires_grad=True) if with_mask else None
    weight = torch.randn(o, c, kh, kw, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(o, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = deform_conv2d(x, off, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    flat = lambda t: None if t is None else {"shape": list(t.shape), "data": t.detach().reshape(-1).tolist()}
    out.append({
        "name": name, "stride": list(stride), "padding": list(padding), "dilation": list(dilation),
        "input": flat(x), "offset": flat(off), "mask": flat(mask), "weight": flat(weight), "bias": flat(bias),
        "output": flat(y), "grad_output": flat(g),
        "grad_input": flat(x.grad), "grad_offset": flat(off.grad), "grad_mask": flat(mask.grad if mask is not None else None),
        "grad_weight": flat(weight.grad), "grad_bias": flat(bias.grad if bias is not None else None),
    })
path = pathlib.Path(__file__).resolve().parent.parent / "crates/model/tests/data/deform_golden.json"
path.write_text(json.dumps({"torch": torch.__version__, "cases": out}))
print(f"wrote {path} ({len(out)} cases)")
