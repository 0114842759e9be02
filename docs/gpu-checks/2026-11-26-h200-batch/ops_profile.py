# Per-op forward+backward time at the network's shapes, M stacked networks (F = 32, 256x256),
# contiguous vs channels-last: where does a batched step's time go?
import torch, time, torch.nn.functional as Fn
torch.backends.cudnn.benchmark = False
dev = 'cuda'
def bench(f, *xs, n=10):
    for _ in range(3): f(*xs).sum().backward()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(*xs).sum().backward(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2] * 1e3
F, S = 32, 256
for M in (1, 16):
    C = M * F
    for fmt in ('nchw', 'nhwc'):
        mf = torch.channels_last if fmt == 'nhwc' else torch.contiguous_format
        x = torch.randn(1, C, S, S, device=dev).to(memory_format=mf).requires_grad_()
        res = {}
        for name, k, d in (('dw5', 5, 1), ('dw3', 3, 1), ('dw5d2', 5, 2), ('dw7d3', 7, 3)):
            w = torch.randn(C, 1, k, k, device=dev).to(memory_format=mf).requires_grad_()
            res[name] = bench(lambda x, w: Fn.conv2d(x, w, None, 1, d * (k - 1) // 2, d, C), x, w)
        w1 = torch.randn(C, F, 1, 1, device=dev).to(memory_format=mf).requires_grad_()
        res['pw_grouped'] = bench(lambda x, w: Fn.conv2d(x, w, None, 1, 0, 1, M), x, w1)
        w3 = torch.randn(C, 3 * F, 1, 1, device=dev).to(memory_format=mf).requires_grad_()
        x3 = torch.randn(1, 3 * C, S, S, device=dev).to(memory_format=mf).requires_grad_()
        res['mix_grouped'] = bench(lambda x, w: Fn.conv2d(x, w, None, 1, 0, 1, M), x3, w3)
        xs = torch.randn(1, 3 * M, S, S, device=dev).to(memory_format=mf).requires_grad_()
        ws = torch.randn(C, 3, 3, 3, device=dev).to(memory_format=mf).requires_grad_()
        res['stem'] = bench(lambda x, w: Fn.conv2d(x, w, None, 1, 1, 1, M), xs, ws)
        g = torch.ones(C, device=dev, requires_grad=True); b = torch.zeros(C, device=dev, requires_grad=True)
        res['bn'] = bench(lambda x, g, b: Fn.batch_norm(x, None, None, g, b, True), x, g, b)
        res['gelu'] = bench(lambda x: Fn.gelu(x), x)
        print(M, fmt, ' '.join(f'{k}={v:.2f}' for k, v in res.items()), flush=True)
    wb = torch.randn(M, F, F, device=dev, requires_grad=True)
    xc = torch.randn(1, C, S, S, device=dev, requires_grad=True)
    print(M, 'pw_bmm', round(bench(lambda x, w: torch.matmul(w, x.view(M, F, S * S)), xc, wb), 2))
    r = torch.randn(M, F, S, S, device=dev, requires_grad=True)
    print(M, 'ce', round(bench(lambda r: Fn.cross_entropy(r, r.detach().argmax(1), reduction='none').mean((1, 2)), r), 2))
