"""Both engines of resnorm.norms (the C++ CPU kernels and the tensor-op path) against references
(PyTorch's own layers, and the textbook modules of resnorm.reference), in both memory layouts,
with and without the fused ReLU (float64)."""
import shutil
import warnings

import pytest
import torch
from torch import nn

import resnorm.kernels as kernels_mod
import resnorm.norms as norms
import resnorm.reference as textbook
from resnorm.model import ResNet
from resnorm.norms import make_norm

# (4, 16, 5, 7): 16 channels divide the 64 lanes, 560 values per sample leave a tail of 48;
# (3, 6, 4, 4): 6 channels do not divide 64 (the plain loop); (2, 8, 32, 32): 1,024-value rows;
# (2, 128, 2, 2) and (3, 96, 3, 3): the wide channels and tiny maps of torchvision's last stages
# (channels_last walks rows of C values; NCHW has rows of 4 and 9 values, summed a sample at a
# time across rows); (10, 12, 1, 5): NCHW rows of a length without its own unrolled loop, more
# samples than GN's side-by-side group sums take at once (8), 12 channels in 2 groups
SHAPES = [(4, 16, 5, 7), (3, 6, 4, 4), (2, 8, 32, 32), (2, 128, 2, 2), (3, 96, 3, 3), (10, 12, 1, 5)]
NAMES = ["bn", "in", "bin", "ln", "gn"]


def reference(name, c, groups, source="torch"):
    """PyTorch's layer for the scheme (BIN has none), or the textbook module of resnorm.reference."""
    if source == "textbook" or name == "bin":
        return textbook.REFERENCE[name](c, **({"num_groups": groups} if name == "gn" else {}))
    return {"bn": lambda: nn.BatchNorm2d(c), "in": lambda: nn.InstanceNorm2d(c, affine=True),
            "ln": lambda: nn.GroupNorm(1, c), "gn": lambda: nn.GroupNorm(groups, c)}[name]()


@pytest.fixture(params=["kernels", "tensor-ops"])
def engine(request, monkeypatch):
    if request.param == "kernels":
        if not (shutil.which("c++") or shutil.which("g++")):
            pytest.skip("no C++ compiler on this machine: only the tensor-op engine can run")
        assert kernels_mod.cpu_kernels() is not None, "the C++ kernels did not build on this machine"
    else:
        monkeypatch.setattr(norms, "cpu_kernels", lambda: None)
    return request.param


def run_pair(name, shape, fmt, relu, steps=2, train=True, source="torch"):
    c = shape[1]
    groups = 2 if c % 2 == 0 else 3
    torch.manual_seed(0)
    ours = make_norm(name, c, **({"num_groups": groups} if name == "gn" else {})).double()
    ref = reference(name, c, groups, source).double()
    if relu:
        ours.fuse_relu_()
    with torch.no_grad():
        params = {"weight": torch.randn(c), "bias": torch.randn(c), "rho": torch.rand(c) * 0.8 + 0.1}
        for m in (ours, ref):
            for k, p in m.named_parameters():
                p.copy_(params[k])
    ours.train(train), ref.train(train)
    for _ in range(steps):
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).contiguous(memory_format=fmt)
        xs = [x.clone(memory_format=torch.preserve_format).requires_grad_() for _ in range(2)]
        ys = [ours(xs[0]), ref(xs[1])]
        if relu:
            ys[1] = torch.relu(ys[1])
        g = torch.randn_like(ys[0])
        for m in (ours, ref):
            m.zero_grad()
        for y in ys:
            (y * g).sum().backward()
    grads = [[p.grad for _, p in sorted(m.named_parameters())] for m in (ours, ref)]
    return ours, ref, ys, [t.grad for t in xs], grads


@pytest.mark.parametrize("source", ["torch", "textbook"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_engines_match_references(engine, name, shape, fmt, relu, source):
    if source == "textbook" and name == "bin":
        pytest.skip("BIN's only reference is the textbook one (run under source=torch)")
    ours, ref, ys, gx, gp = run_pair(name, shape, fmt, relu, source=source)
    close = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ys[0], ys[1], **close)
    torch.testing.assert_close(gx[0], gx[1], **close)
    for a, b in zip(*gp):
        torch.testing.assert_close(a, b, **close)
    assert ys[0].is_contiguous(memory_format=fmt) and gx[0].is_contiguous(memory_format=fmt)
    if name == "bn":
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **close)
        torch.testing.assert_close(ours.running_var, ref.running_var, **close)
        ours.eval(), ref.eval()
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt)
        want = torch.relu(ref(x)) if relu else ref(x)
        torch.testing.assert_close(ours(x), want, **close)


def test_eval_mode_gradients_through_running_statistics(engine):
    """In eval, BN's statistics are constants: the gradient is that of a fixed affine map."""
    ours, ref, *_ = run_pair("bn", SHAPES[0], torch.channels_last, relu=True, steps=1)
    ours.eval(), ref.eval()
    x = torch.randn(SHAPES[0], dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [ours(xs[0]), torch.relu(ref(xs[1]))]
    for y in ys:
        y.pow(2).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-9, atol=1e-10)


def test_engines_agree_on_bin_in_eval(monkeypatch):
    """BIN in eval mixes running BN statistics with batch IN ones: both engines, same numbers."""
    def run():
        m, *_ = run_pair("bin", SHAPES[0], torch.channels_last, relu=True, steps=2)
        m.eval()
        x = torch.randn(SHAPES[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        y = m(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, m.rho.grad, m.running_var
    a = run()
    monkeypatch.setattr(norms, "cpu_kernels", lambda: None)
    b = run()
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


def test_engines_agree_in_float32_on_a_network():
    """The default training setting: float32, channels_last, a whole ResNet step."""
    def step(enabled):
        torch.manual_seed(0)
        model = ResNet(1, 5, norm="bin").to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        saved = norms.cpu_kernels
        if not enabled:
            norms.cpu_kernels = lambda: None
        try:
            loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 5)
            loss.backward()
        finally:
            norms.cpu_kernels = saved
        return loss.detach(), [p.grad for p in model.parameters()]
    (la, ga), (lb, gb) = step(True), step(False)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_kernel_results_do_not_depend_on_thread_count():
    def run(threads):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_pair("bin", (8, 16, 12, 12), torch.channels_last, relu=True)
        finally:
            torch.set_num_threads(saved)
    _, _, ys1, gx1, gp1 = run(1)
    _, _, ys2, gx2, gp2 = run(2)
    assert torch.equal(ys1[0], ys2[0]) and torch.equal(gx1[0], gx2[0])
    assert all(torch.equal(a, b) for a, b in zip(gp1[0], gp2[0]))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["in", "ln", "gn"])
def test_sample_local_results_do_not_depend_on_the_blocks_of_samples(name, fmt):
    """IN, GN and LN run in blocks of samples sized by the thread count (kernels.cpp block_of): 11
    samples go in blocks of 8 + 3 on one thread, 6 + 5 on two, 4 + 4 + 3 on three; 160 channels
    are two 64-channel runs and a tail of 32 (channels_last). Every result is the same bit for bit."""
    def run(threads):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_pair(name, (11, 160, 3, 3), fmt, relu=True)
        finally:
            torch.set_num_threads(saved)
    (_, _, ys1, gx1, gp1), *others = [run(t) for t in (1, 2, 3)]
    for _, _, ys, gx, gp in others:
        assert torch.equal(ys1[0], ys[0]) and torch.equal(gx1[0], gx[0])
        assert all(torch.equal(a, b) for a, b in zip(gp1[0], gp[0]))


def row_order_sums(v: torch.Tensor) -> torch.Tensor:
    """Per-(n, c) sums of v's values converted to double, added one at a time in row order from 0."""
    rows = v.double().flatten(2)
    s = torch.zeros(rows.shape[:2], dtype=torch.float64)
    for i in range(rows.shape[2]):
        s = s + rows[..., i]
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [128, 96])
def test_channels_last_sums_are_plain_double_sums_in_row_order(c, dtype):
    """The vectorised channels_last sums (kernels.cpp lane_sums, 64 channels at a time; 96 leaves a
    plain-loop tail of 32) held to a plain loop, bit for bit: IN's per-cell mean in the state, and
    with the fused ReLU the bias and weight gradients, from the gated g (g where x * scale + shift > 0,
    in x's dtype, scale and shift rounded from double) and g * x summed in row order, then over samples."""
    k = kernels_mod.cpu_kernels()
    if k is None:
        pytest.skip("no C++ kernels on this machine")
    torch.manual_seed(0)
    n, hw = 3, 6                                             # 6: mean = sum / 6, not a power of two
    x = (torch.randn(n, c, 2, 3, dtype=dtype) * 3 + 1).contiguous(memory_format=torch.channels_last)
    g = torch.randn(n, c, 2, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    e = norms._EMPTY
    _, state = k.norm_forward(x, [norms.CELL], [1], [w], [e], [e], [e], [e], 0.0, 1.0, b, 1e-5, True)
    mean, rstd = state[:n * c].view(n, c), state[n * c:].view(n, c)
    assert torch.equal(mean, row_order_sums(x) / hw)
    _, d_bias, d_weight = k.norm_backward(g, x, state, [norms.CELL], [1], [w], b, True, True, False)
    s = w.double() * rstd
    scale, shift = (0.0 + s).to(dtype), (b.double() - s * mean).to(dtype)
    gated = g * ((x * scale[..., None, None] + shift[..., None, None]) > 0).to(dtype)
    sg, sgx = row_order_sums(gated), row_order_sums(gated.double() * x.double())
    d_b, d_w = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for i in range(n):
        d_b = d_b + sg[i]
        d_w = d_w + rstd[i] * (sgx[i] - mean[i] * sg[i])
    assert torch.equal(d_bias, d_b) and torch.equal(d_weight, d_w)


def test_model_fuses_relu_into_from_scratch_norms_only():
    ours, builtin = ResNet(1, 3, norm="gn"), ResNet(1, 3, norm="torch_bn")
    assert ours.norm1.fused_relu and isinstance(ours.act1, nn.Identity)
    assert all(b.norm1.fused_relu and not b.norm2.fused_relu for s in (ours.stage1, ours.stage2) for b in s)
    assert isinstance(builtin.act1, nn.ReLU) and isinstance(builtin.stage1[0].act1, nn.ReLU)
    assert "fused_relu=True" in repr(ours.norm1)


def test_missing_compiler_falls_back_with_one_warning(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(*a, **k):
        raise RuntimeError("Error building extension 'resnorm_kernels'\nmore lines")
    monkeypatch.setattr(ext, "load", broken)
    kernels_mod.cpu_kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable .*Error building extension"):
            assert kernels_mod.cpu_kernels() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels_mod.cpu_kernels() is None          # cached: warned once
        m = make_norm("bn", 4)
        x = torch.randn(3, 4, 5, 5, requires_grad=True)
        m(x).sum().backward()                                  # the tensor-op engine still trains
        assert x.grad is not None
    finally:
        kernels_mod.cpu_kernels.cache_clear()
    monkeypatch.setenv("RESNORM_KERNELS", "0")
    try:
        assert kernels_mod.cpu_kernels() is None
    finally:
        kernels_mod.cpu_kernels.cache_clear()


def test_bin_gate_learns_from_its_initial_value_of_one(monkeypatch):
    """rho starts at exactly 1, a bound of the clamp: its gradient must still flow (torch.clamp
    would pass none there and freeze BIN into BN), the same in every engine."""
    def rho_grad(path):
        torch.manual_seed(0)
        m = make_norm("bin", 4).double()
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
        if path == "plain":                                   # the autograd path (as under torch.compile)
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        elif path == "tensor-ops":
            monkeypatch.setattr(norms, "cpu_kernels", lambda: None)
        try:
            (m(x.requires_grad_()) * torch.linspace(-1, 1, 300, dtype=torch.float64).view(3, 4, 5, 5)).sum().backward()
        finally:
            monkeypatch.undo()
        return m.rho.grad
    grads = {p: rho_grad(p) for p in ("kernels", "tensor-ops", "plain")}
    assert grads["kernels"].abs().min() > 0
    torch.testing.assert_close(grads["kernels"], grads["tensor-ops"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads["kernels"], grads["plain"], rtol=1e-9, atol=1e-12)


def test_build_is_keyed_by_source_and_shared_by_every_checkout(tmp_path, monkeypatch):
    """The build's name changes with kernels.cpp (and torch's version); the source it compiles is a
    copy in the build folder, so a second checkout (DVC's experiment copies) reuses the build."""
    key = kernels_mod._build_key()
    edited = tmp_path / "kernels.cpp"
    edited.write_text(kernels_mod.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(kernels_mod, "SOURCE", edited)
    assert kernels_mod._build_key() != key
    build = tmp_path / "build"
    build.mkdir()
    copy = kernels_mod._source_in(build)
    assert copy == build / "kernels.cpp" and copy.read_text() == edited.read_text()
    assert kernels_mod._source_in(build) == copy and not list(build.glob(".*.tmp"))


def test_a_build_that_does_not_load_is_rebuilt_once(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as ext
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    library = tmp_path / kernels_mod.NAME / f"{kernels_mod.NAME}.so"
    library.parent.mkdir()
    library.write_bytes(b"truncated")
    calls = []

    def load(name, sources, **kw):
        calls.append(sources[0])
        if len(calls) == 1:
            raise ImportError(f"{library}: invalid ELF header")
        assert not library.exists()                   # removed, so ninja builds it again
        return "rebuilt module"
    monkeypatch.setattr(ext, "load", load)
    kernels_mod.cpu_kernels.cache_clear()
    try:
        assert kernels_mod.cpu_kernels() == "rebuilt module"
    finally:
        kernels_mod.cpu_kernels.cache_clear()
    assert calls == [str(library.parent / "kernels.cpp")] * 2


def test_the_build_uses_the_ninja_beside_this_python(monkeypatch, tmp_path):
    """A venv's ninja and a system ninja hash build commands differently: an activated shell and a bare
    `.venv/bin/python` would rebuild each other's kernels at every switch. The build runs with this
    Python's bin folder first on PATH (when it has a ninja), and PATH is restored afterwards."""
    import os
    import sys
    from pathlib import Path
    import torch.utils.cpp_extension as ext
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    seen = []
    monkeypatch.setattr(ext, "load", lambda *a, **k: seen.append(os.environ["PATH"]) or "module")
    kernels_mod.cpu_kernels.cache_clear()
    try:
        assert kernels_mod.cpu_kernels() == "module"
    finally:
        kernels_mod.cpu_kernels.cache_clear()
    assert seen == [f"{bin_dir}{os.pathsep}/usr/bin:/bin"] and os.environ["PATH"] == "/usr/bin:/bin"
    (bin_dir / "ninja").unlink()                                   # no ninja there: PATH as it was
    try:
        kernels_mod.cpu_kernels()
    finally:
        kernels_mod.cpu_kernels.cache_clear()
    assert seen[-1] == "/usr/bin:/bin" and Path(seen[-1].split(os.pathsep)[0]) != bin_dir
