import time, statistics, torch, sys
from torch import nn
from resnorm import norms
from resnorm.norms import make_norm, _kernels_for
torch.set_num_threads(2)
flush = torch.empty(4 << 20)
fmt = torch.channels_last
R = 25
for shape in ((32, 512, 2, 2), (32, 256, 4, 4), (32, 128, 8, 8), (32, 64, 16, 16)):
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn(shape).contiguous(memory_format=fmt)
    for name, ref in (("ln", nn.GroupNorm(1, shape[1])), ("bn", nn.BatchNorm2d(shape[1]))):
        m = make_norm(name, shape[1]); K = _kernels_for(x)
        runs = {
            "module(node)": lambda: m(x).backward(g),
            "Function": lambda: norms._Normalize.apply(x, m, m.weight, m.bias).backward(g),
            "node": lambda: norms._kernel_node(K, m, x, (m.weight, m.bias)).backward(g),
            "builtin": lambda: ref(x).backward(g),
        }
        t = {k: [] for k in runs}
        for _ in range(R + 3):
            for k, f in runs.items():
                flush.fill_(1.0); t0 = time.perf_counter(); f(); t[k].append((time.perf_counter() - t0) * 1e6); x.grad = None
        print(name, shape, "  ".join(f"{k} {statistics.median(v[3:]):.0f}" for k, v in t.items()))
