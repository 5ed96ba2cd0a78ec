"""Each from-scratch norm equals its reference (float64): outputs, gradients, running statistics."""
import pytest
import torch
from torch import nn

from resnorm.norms import (NORMS, BatchInstanceNorm, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NoNorm,
                           clamp_gates_, make_norm)

SHAPES = [(4, 6, 5, 7), (3, 6, 1, 1), (2, 6, 3, 8)]     # non-square and 1x1 maps


def paired(ours, ref, shape, steps=1, train=True):
    """Run both modules on the same inputs; return outputs and grads of input / weight / bias."""
    torch.manual_seed(0)
    ours, ref = ours.double(), ref.double()
    with torch.no_grad():
        w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    ours.train(train)
    ref.train(train)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 1
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ys = [ours(xs[0]), ref(xs[1])]
        g = torch.randn_like(ys[0])
        for m in (ours, ref):
            m.zero_grad()
        for y in ys:
            (y * g).sum().backward()
    return ys, [xs[0].grad, xs[1].grad], [ours.weight.grad, ref.weight.grad], [ours.bias.grad, ref.bias.grad]


def assert_same(pairs):
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_bn_equals_torch_batchnorm(shape):
    ours, ref = BatchNorm(6), nn.BatchNorm2d(6)
    assert_same(paired(ours, ref, shape, steps=4))
    torch.testing.assert_close(ours.running_mean, ref.running_mean.double(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.running_var, ref.running_var.double(), rtol=1e-9, atol=1e-10)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    x = torch.randn(shape, dtype=torch.float64)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-9, atol=1e-10)


def test_bn_cumulative_momentum_none():
    ours, ref = BatchNorm(6, momentum=None), nn.BatchNorm2d(6, momentum=None)
    paired(ours, ref, SHAPES[0], steps=3)
    torch.testing.assert_close(ours.running_var, ref.running_var.double())


@pytest.mark.parametrize("shape", SHAPES)
def test_in_equals_torch_instancenorm(shape):
    if shape[2] * shape[3] == 1:
        with pytest.raises(ValueError):
            nn.InstanceNorm2d(6, affine=True)(torch.randn(shape))   # the reference refuses 1x1 too
        return
    assert_same(paired(InstanceNorm(6), nn.InstanceNorm2d(6, affine=True), shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_ln_equals_groupnorm_one_group(shape):
    assert_same(paired(LayerNorm(6), nn.GroupNorm(1, 6), shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_gn_equals_torch_groupnorm(shape, groups):
    assert_same(paired(GroupNorm(6, num_groups=groups), nn.GroupNorm(groups, 6), shape))


def test_gn_refuses_groups_that_do_not_divide():
    with pytest.raises(ValueError, match="must divide"):
        GroupNorm(6, num_groups=4)
    with pytest.raises(ValueError, match="must divide"):
        make_norm("gn", 16, num_groups=5)


def direct_bin(x, rho, w, b, eps=1e-5):
    """rho * BN + (1 - rho) * IN then affine, written out with torch.var/mean."""
    def norm(dims):
        m = x.mean(dim=dims, keepdim=True)
        v = x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - m) / torch.sqrt(v + eps)
    y = rho.view(1, -1, 1, 1) * norm((0, 2, 3)) + (1 - rho.view(1, -1, 1, 1)) * norm((2, 3))
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


@pytest.mark.parametrize("rho", [0.0, 1.0, 0.3])
def test_bin_matches_direct_formula(rho):
    torch.manual_seed(1)
    m = BatchInstanceNorm(6).double()
    with torch.no_grad():
        m.rho.fill_(rho)
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    ref = direct_bin(x2, m.rho.detach(), m.weight.detach(), m.bias.detach())
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    if rho == 1.0:
        bn = BatchNorm(6).double()
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if k != "rho"})
        torch.testing.assert_close(bn(x.detach()), y.detach())
    if rho == 0.0:
        inn = InstanceNorm(6).double()
        inn.load_state_dict({"weight": m.weight, "bias": m.bias})
        torch.testing.assert_close(inn(x.detach()), y.detach())


def test_bin_gate_initialised_to_one_and_kept_in_unit_interval():
    m = BatchInstanceNorm(4)
    assert torch.all(m.rho == 1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), m)
    opt = torch.optim.SGD(net.parameters(), lr=100.0)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(4, 3, 6, 6)).pow(3).sum().backward()
        opt.step()
        clamp_gates_(net)
        assert torch.all((m.rho >= 0) & (m.rho <= 1))
    m = BatchInstanceNorm(4)      # even unclamped, the forward pass uses a convex mix
    x = torch.randn(4, 4, 5, 5)
    with torch.no_grad():
        m.rho.fill_(1.0)
        y1 = m(x)
        m.rho.fill_(3.0)
        torch.testing.assert_close(m(x), y1)


@pytest.mark.parametrize("name", ["bn", "in", "bin", "ln", "gn"])
def test_gradcheck(name):
    torch.manual_seed(0)
    m = make_norm(name, 4, **({"num_groups": 2} if name == "gn" else {})).double()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
        if name == "bin":
            m.rho.fill_(0.4)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    params = [m.weight, m.bias]
    assert torch.autograd.gradcheck(lambda x, *_: m(x), (x, *params))


def test_bn_refuses_one_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchInstanceNorm(3)(torch.randn(1, 3, 1, 1))
    m = BatchNorm(3).eval()
    assert m(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)       # fine in eval
    assert BatchNorm(3)(torch.randn(1, 3, 4, 4)).shape == (1, 3, 4, 4)   # batch of 1, many pixels


def test_state_dict_round_trip_and_eval_mode():
    m = BatchInstanceNorm(5)
    for _ in range(3):
        m(torch.randn(4, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        m.rho.fill_(0.25)
    m2 = BatchInstanceNorm(5)
    m2.load_state_dict(m.state_dict())
    for k in ("running_mean", "running_var", "rho", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m2, k), getattr(m, k))
    m.eval(), m2.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(m(x), m2(x))
    # eval uses running statistics: one sample alone gives the same output as inside a batch
    bn = BatchNorm(5)
    bn(torch.randn(8, 5, 4, 4))
    bn.eval()
    batch = torch.randn(4, 5, 4, 4)
    torch.testing.assert_close(bn(batch)[:1], bn(batch[:1]))


def test_registry_and_make_norm():
    assert set(NORMS) == {"bn", "in", "bin", "ln", "gn", "nn", "torch_bn"}
    assert NORMS["torch_bn"] is nn.BatchNorm2d
    assert isinstance(make_norm("nn", 8), NoNorm)
    assert isinstance(make_norm("torch_bn", 8), nn.BatchNorm2d)
    with pytest.raises(ValueError, match="known: bn, in, bin, ln, gn, nn, torch_bn"):
        make_norm("xn", 8)
    for name, cls in NORMS.items():
        assert issubclass(cls, nn.Module)
        m = make_norm(name, 8, eps=1e-3, momentum=0.2, affine=True)
        assert m(torch.randn(2, 8, 3, 3)).shape == (2, 8, 3, 3)


def test_no_builtin_norm_kernels_called(monkeypatch):
    import torch.nn.functional as F
    def forbidden(*a, **k):
        raise AssertionError("built-in norm kernel called")
    for fn in ("batch_norm", "instance_norm", "group_norm", "layer_norm"):
        monkeypatch.setattr(F, fn, forbidden)
        monkeypatch.setattr(torch, fn, forbidden)
    for name in ("bn", "in", "bin", "ln", "gn"):
        m = make_norm(name, 4)
        m(torch.randn(3, 4, 5, 5, requires_grad=True)).sum().backward()
        m.eval()
        m(torch.randn(3, 4, 5, 5))
