"""The 6n+2 ResNet: hand-counted parameters, shapes at several sizes, every norm learns."""
import pytest
import torch

from resnorm.model import ResNet
from resnorm.norms import NORMS
from resnorm.summary import model_summary


def hand_count(n: int, r: int, shortcut: str = "A") -> int:
    """Count by hand: 3x3 convs without bias, 2 affine params per channel per norm, 1x1 projections (B only)."""
    conv = lambda cin, cout, k=3: cin * cout * k * k
    norm = lambda c: 2 * c
    total = conv(3, 16) + norm(16)                                    # first layer
    total += n * 2 * (conv(16, 16) + norm(16))                        # stage 1
    for cin, c in ((16, 32), (32, 64)):                               # stages 2 and 3
        total += conv(cin, c) + norm(c) + conv(c, c) + norm(c)        # first block, stride 2
        if shortcut == "B":
            total += conv(cin, c, 1) + norm(c)                        # projection shortcut
        total += (n - 1) * 2 * (conv(c, c) + norm(c))
    return total + 64 * r + r                                         # linear layer


def params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_by_hand():
    assert hand_count(3, 10) == 269_722                    # He et al.'s option-A ResNet-20: "0.27M"
    assert params(ResNet(3, 10, norm="bn")) == 269_722
    assert params(ResNet(3, 10, norm="torch_bn")) == 269_722
    assert params(ResNet(2, 25, norm="bn")) == hand_count(2, 25)
    assert hand_count(2, 25, "B") == 176_233
    assert params(ResNet(2, 25, norm="bn", shortcut="B")) == 176_233
    assert params(ResNet(3, 10, norm="bn", shortcut="B")) == hand_count(3, 10, "B") == 272_474


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_option_a_has_exactly_6n_plus_2_weighted_layers(n):
    weighted = lambda m: sum(isinstance(x, (torch.nn.Conv2d, torch.nn.Linear)) for x in m.modules())
    a, b = ResNet(n, 10), ResNet(n, 10, shortcut="B")
    assert weighted(a) == a.depth == 6 * n + 2
    assert weighted(b) == b.depth == 6 * n + 4              # two 1x1 projection convs
    assert model_summary(n, 10, 32)["weighted_layers"] == 6 * n + 2
    assert model_summary(n, 10, 32, shortcut="B")["weighted_layers"] == 6 * n + 4
    assert model_summary(3, 10, 32)["params"] == 269_722


def test_option_a_shortcut_is_identity_subsampled_and_zero_padded():
    from resnorm.model import ZeroPadShortcut
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xs = x.detach().contiguous(memory_format=fmt).requires_grad_()
        out = ZeroPadShortcut(16, 32, 2)(xs)
        assert out.shape == (2, 32, 4, 4) and out.is_contiguous(memory_format=fmt)
        assert torch.equal(out[:, :16], xs[:, :, ::2, ::2]) and not out[:, 16:].any()
        out.sum().backward()
        assert torch.equal(xs.grad[:, :, ::2, ::2], torch.ones(2, 16, 4, 4)) and xs.grad.sum() == 2 * 16 * 16
    assert not list(ZeroPadShortcut(16, 32, 2).parameters())
    with pytest.raises(ValueError, match="shortcut"):
        ResNet(2, 10, shortcut="C")


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


@pytest.mark.parametrize("arch, params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
@pytest.mark.parametrize("norm", ["bn", "torch_bn", "gn"])
def test_torchvision_resnets_take_every_norm_with_published_parameter_counts(arch, params, norm):
    """torchvision's builders with this project's norms: the BN family (affine weight and bias per
    channel) gives torchvision's published counts at 1000 classes."""
    from resnorm.model import build_model
    m = build_model(arch, 1000, norm)
    assert sum(p.numel() for p in m.parameters()) == params


@pytest.mark.parametrize("norm", ["bn", "in", "bin", "ln", "gn", "nn", "torch_bn"])
def test_resnet18_runs_forward_and_backward_with_every_norm(norm):
    from resnorm.model import build_model
    torch.manual_seed(0)
    m = build_model("resnet18", 5, norm)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = m(x)
    out.sum().backward()
    assert out.shape == (2, 5) and torch.isfinite(x.grad).all()


def test_build_model_checks_its_arguments():
    from resnorm.model import ResNet, build_model
    assert isinstance(build_model("resnet6n2", 10, "gn", n=3, gn_groups=4), ResNet)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg16", 10)
    with pytest.raises(ValueError, match="gn_groups = 48 must divide every width of resnet50"):
        build_model("resnet50", 10, "gn", gn_groups=48)


@pytest.mark.parametrize("arch, depth, gmacs", [("resnet18", 18, 1.81), ("resnet34", 34, 3.66), ("resnet50", 50, 4.09)])
def test_summary_of_torchvision_resnets_agrees_with_published_figures(arch, depth, gmacs):
    """The ResNet notes' question: weighted layers on the main path, and torchvision's GMACs at 224, within 1%."""
    from resnorm.summary import arch_summary
    s = arch_summary(arch, 1000, 224, "bn")
    assert s["depth"] == depth
    assert s["macs"] / 1e9 == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_preact_blocks_keep_the_layer_count_and_parameters(n, shortcut):
    """He et al. 2016's pre-activation block: norm -> ReLU -> conv twice, then the addition; a final
    norm + ReLU before the pool. Same weighted layers (6n+2 with option A) and, with option A, the
    same parameters: the norms move (one on the stem conv becomes one before the pool), none is added.
    Option B's projections have no norm of their own in a preact net."""
    from resnorm.model import PreActBlock
    from resnorm.summary import summarize
    basic, pre = ResNet(n, 10, shortcut=shortcut), ResNet(n, 10, shortcut=shortcut, block="preact")
    assert summarize(pre, 32)["weighted_layers"] == summarize(basic, 32)["weighted_layers"] \
        == 6 * n + 2 + (2 if shortcut == "B" else 0)
    diff = params(basic) - params(pre)
    assert diff == (0 if shortcut == "A" else 2 * (32 + 64))        # B: two projection norms fewer
    assert all(isinstance(b, PreActBlock) for s in (pre.stage1, pre.stage2, pre.stage3) for b in s)
    assert len(pre.gradcam_layers()) == 2 * n and pre.gradcam_layers()[-1] is pre.stage3[-1].conv2


def test_preact_block_computes_norm_relu_conv_twice_then_adds():
    """The block's arithmetic written out with plain torch ops (torch_bn, so the norm is nn.BatchNorm2d)."""
    from resnorm.model import PreActBlock
    torch.manual_seed(0)
    b = PreActBlock(8, 8, 1, "torch_bn", 4).eval()
    x = torch.randn(2, 8, 6, 6)
    h = b.conv1(torch.relu(b.norm1(x)))
    want = b.conv2(torch.relu(b.norm2(h))) + x
    torch.testing.assert_close(b(x), want)
    pre = ResNet(1, 3, norm="nn", block="preact")                   # no norm: the ReLU must not touch x in place
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    pre(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_before_the_classifier_keeps_the_weight_names():
    from resnorm.model import DropoutLinear, build_model
    for m in (ResNet(1, 4, dropout=0.5), build_model("resnet18", 4, "bn", dropout=0.5)):
        assert isinstance(m.fc, DropoutLinear) and {"fc.weight", "fc.bias"} <= set(m.state_dict())
        m.train()
        feats = torch.ones(64, m.fc.in_features)
        assert (m.fc(feats) != m.fc(feats)).any()                   # masks differ between calls in training
        m.eval()
        torch.testing.assert_close(m.fc(feats), torch.nn.functional.linear(feats, m.fc.weight, m.fc.bias))
    torch.manual_seed(3)
    a = ResNet(1, 4)
    torch.manual_seed(3)
    b = ResNet(1, 4, dropout=0.3)                                    # the same initial weights with or without it
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_model_from_config_rebuilds_every_arch_and_old_checkpoints():
    from resnorm.model import model_from_config
    m = model_from_config({"arch": "resnet18", "num_classes": 3, "norm": "gn", "gn_groups": 4, "dropout": 0.1,
                           "image_size": 32})
    assert m.fc.out_features == 3 and m.fc.dropout == 0.1
    old = model_from_config({"n": 2, "num_classes": 5, "norm": "bn", "shortcut": "A", "gn_groups": 4,
                             "image_size": 32})                      # a checkpoint from before model.arch
    assert isinstance(old, ResNet) and old.n == 2 and old.block == "basic"


@pytest.mark.parametrize("args, words", [(["--n", "0"], "argument --n: 0 is not allowed: at least 1"),
                                         (["--classes", "x"], "argument --classes: 'x' is not a whole number"),
                                         (["--norm", "foo"], "argument --norm: invalid choice: 'foo'"),
                                         (["--size", "30"], "--size must be divisible by 4")])
def test_summary_cli_refuses_bad_arguments_in_one_line(args, words, capsys):
    from resnorm.summary import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1] and not any("Traceback" in x for x in err)
