"""The textbook norms of resnorm.reference are right: equal to PyTorch's layers where PyTorch has one,
and BIN equal to BN at rho = 1 and to IN at rho = 0. (tests/test_kernels.py holds the fast engines
to these modules.)"""
import pytest
import torch
from torch import nn

from resnorm import reference as textbook

TORCH = {"bn": lambda c: nn.BatchNorm2d(c), "in": lambda c: nn.InstanceNorm2d(c, affine=True),
         "ln": lambda c: nn.GroupNorm(1, c), "gn": lambda c: nn.GroupNorm(4, c)}


def randomize(*modules):
    torch.manual_seed(1)
    w, b = torch.randn(8), torch.randn(8)
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w), m.bias.copy_(b)


@pytest.mark.parametrize("name", list(TORCH))
def test_textbook_equals_pytorch(name):
    ours = textbook.REFERENCE[name](8, **({"num_groups": 4} if name == "gn" else {})).double()
    ref = TORCH[name](8).double()
    randomize(ours, ref)
    for _ in range(2):
        x = torch.randn(5, 8, 6, 7, dtype=torch.float64) * 2 + 3
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(ya)
        (ya * g).sum().backward(), (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-10, atol=1e-10)
    if name == "bn":
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=0)
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


def test_textbook_bin_is_bn_at_one_and_in_at_zero():
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    bn, inn = textbook.BatchNorm(8).double(), textbook.InstanceNorm(8).double()
    for rho, want in ((1.0, bn), (0.0, inn)):
        m = textbook.BatchInstanceNorm(8, rho_init=rho).double()
        torch.testing.assert_close(m(x), want(x), rtol=1e-12, atol=1e-12)


def test_textbook_gn_is_the_reshape_formula():
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    rows = x.reshape(3, 2, -1)
    want = ((rows - rows.mean(2, keepdim=True)) / (rows.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt())
    torch.testing.assert_close(textbook.GroupNorm(8, num_groups=2).double()(x), want.reshape(x.shape))
