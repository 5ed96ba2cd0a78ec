"""The 6n+2 ResNet: hand-counted parameters, shapes at several sizes, every norm learns."""
import pytest
import torch

from resnorm.model import ResNet
from resnorm.norms import NORMS
from resnorm.summary import model_summary


def hand_count(n: int, r: int) -> int:
    """Count by hand: 3x3 convs without bias, 2 affine params per channel per norm, 1x1 projections."""
    conv = lambda cin, cout, k=3: cin * cout * k * k
    norm = lambda c: 2 * c
    total = conv(3, 16) + norm(16)                                    # first layer
    total += n * 2 * (conv(16, 16) + norm(16))                        # stage 1
    for cin, c in ((16, 32), (32, 64)):                               # stages 2 and 3
        total += conv(cin, c) + norm(c) + conv(c, c) + norm(c)        # first block, stride 2
        total += conv(cin, c, 1) + norm(c)                            # projection shortcut
        total += (n - 1) * 2 * (conv(c, c) + norm(c))
    return total + 64 * r + r                                         # linear layer


def params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_by_hand():
    assert hand_count(2, 25) == 176_233
    assert params(ResNet(2, 25, norm="bn")) == hand_count(2, 25)
    assert params(ResNet(3, 10, norm="bn")) == hand_count(3, 10)
    assert params(ResNet(3, 10, norm="torch_bn")) == hand_count(3, 10)
    # BIN adds one gate per channel per norm; NN has no norms but conv biases
    s = model_summary(2, 25, 32)
    assert s["params"] == 176_233 and s["weighted_layers"] == 14


@pytest.mark.parametrize("size", [32, 64, 256])
def test_output_shape_and_stage3_resolution(size):
    m = ResNet(2, 7, norm="gn")
    feats = {}
    m.gradcam_layers()[-1].register_forward_hook(lambda mod, i, o: feats.setdefault("x", o))
    y = m(torch.randn(2, 3, size, size))
    assert y.shape == (2, 7)
    assert feats["x"].shape[-2:] == (size // 4, size // 4)
    assert len(m.gradcam_layers()) == 2 * m.n


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        ResNet(1, 3)(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="n must be"):
        ResNet(0, 3)


@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_learns_a_tiny_batch(norm):
    torch.manual_seed(0)
    m = ResNet(1, 4, norm=norm)
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
