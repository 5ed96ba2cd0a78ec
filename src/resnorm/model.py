"""The 6n+2-layer ResNet of He et al. 2015, section 4.2, with a pluggable normalization;
and torchvision's ResNet-18/34/50 with the same norms (`build_model`).

  conv3x3(16) -> [n blocks, 16 filters, S x S] -> [n blocks, 32, S/2] -> [n blocks, 64, S/4]
  -> global mean pool -> (dropout) -> linear(r)

Each block is two 3x3 convs with a residual connection; the first block of stages
2 and 3 downsamples with a stride-2 conv. Its shortcut is, as in section 4.2, option A:
the identity subsampled with stride 2 and zero-padded to the new channel count, with
no parameters, so the net has exactly 6n+2 weighted layers (ResNet-20: 0.27M parameters).
Option B (a 1x1 stride-2 projection conv and a norm, 2 more weighted layers) stays
available as `shortcut="B"`. A normalization layer follows every conv; where a ReLU
follows the norm directly, the from-scratch norms apply it in the same pass over the
activation.

`block="preact"` swaps in the pre-activation block of He et al. 2016 ("Identity Mappings";
the workshop's variant A): norm -> ReLU -> conv, twice, then the addition, with a final
norm + ReLU before the pool. The layer count, the shortcuts and Grad-CAM's target layers
(the last 2n convs) stay the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .norms import make_norm
from .params import SHORTCUTS

WIDTHS = (16, 32, 64)


def _norm_options(norm: str, gn_groups: int) -> dict:
    return {"num_groups": gn_groups} if norm == "gn" else {}


def norm_relu(norm: str, channels: int, gn_groups: int, inplace: bool = True) -> tuple[nn.Module, nn.Module]:
    """A norm followed by a ReLU, as (norm, activation): the from-scratch norms apply the ReLU
    in their own pass (activation is then nn.Identity); others get an nn.ReLU (`inplace=False`
    where the norm's input is still needed: with norm "nn" the norm returns its input itself)."""
    layer = make_norm(norm, channels, **_norm_options(norm, gn_groups))
    if hasattr(layer, "fuse_relu_"):
        return layer.fuse_relu_(), nn.Identity()
    return layer, nn.ReLU(inplace=inplace)


class DropoutLinear(nn.Linear):
    """The classifier: dropout on its input, then nn.Linear. A Linear itself, so the weights keep
    the names `fc.weight` / `fc.bias` with or without dropout (torchvision's weights load as they are)."""

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if not 0 <= dropout < 1:
            raise ValueError(f"DropoutLinear: dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout:
            x = nn.functional.dropout(x, self.dropout, self.training)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dropout={self.dropout}" if self.dropout else "")


def _shortcut(in_channels: int, out_channels: int, stride: int, shortcut: str, bias: bool,
              norm: nn.Module | None) -> nn.Module:
    """Identity where the shape stays; else option A (zero-padding) or B (1x1 projection, then `norm`)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if shortcut == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    conv = nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias)
    return nn.Sequential(conv, norm) if norm is not None else conv


class ZeroPadShortcut(nn.Module):
    """Option A: x subsampled with `stride`, its channels kept and zeros appended up to `out_channels`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut: cannot shrink {in_channels} channels to {out_channels}")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = x[:, :, ::self.stride, ::self.stride]
        out = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                          memory_format=fmt)      # keep the block's layout (channels_last stays so)
        out[:, :self.in_channels] = x
        out[:, self.in_channels:] = 0
        return out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, gn_groups: int,
                 shortcut: str = "A"):
        super().__init__()
        opts = _norm_options(norm, gn_groups)
        bias = norm == "nn"            # without a norm's affine shift, convs keep their own bias
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1, self.act1 = norm_relu(norm, out_channels, gn_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = make_norm(norm, out_channels, **opts)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut, bias,
                                  make_norm(norm, out_channels, **opts) if shortcut == "B" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """He et al. 2016's pre-activation block: norm -> ReLU -> conv, twice, then the addition, and
    nothing after it, so the identity path runs unchanged from block to block. The shortcut takes
    the block's input as it is (option A), or a 1x1 projection of it without a norm (option B)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, gn_groups: int,
                 shortcut: str = "A"):
        super().__init__()
        bias = norm == "nn"
        self.norm1, self.act1 = norm_relu(norm, in_channels, gn_groups, inplace=False)   # x is the shortcut's too
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm2, self.act2 = norm_relu(norm, out_channels, gn_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.shortcut = _shortcut(in_channels, out_channels, stride, shortcut, bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.norm1(x)))
        out = self.conv2(self.act2(self.norm2(out)))
        return out + self.shortcut(x)


BLOCKS = {"basic": BasicBlock, "preact": PreActBlock}


class ResNet(nn.Module):
    """ResNet with 6n+2 weighted layers (option A) and `num_classes` outputs; any input size divisible by 4."""

    def __init__(self, n: int, num_classes: int, norm: str = "bn", shortcut: str = "A", in_channels: int = 3,
                 gn_groups: int = 4, block: str = "basic", dropout: float = 0.0):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"ResNet: shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        if block not in BLOCKS:
            raise ValueError(f"ResNet: block must be one of {', '.join(BLOCKS)}, got {block!r}")
        if n < 1:
            raise ValueError(f"ResNet: n must be >= 1, got {n}")
        if num_classes < 1:
            raise ValueError(f"ResNet: num_classes must be >= 1, got {num_classes}")
        self.n, self.num_classes, self.norm, self.shortcut, self.block = n, num_classes, norm, shortcut, block
        bias = norm == "nn"
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=bias)
        if block == "basic":
            self.norm1, self.act1 = norm_relu(norm, WIDTHS[0], gn_groups)
        else:                          # pre-activation: the first block's norm -> ReLU follows the stem conv
            self.norm1, self.act1 = nn.Identity(), nn.Identity()
        stages, cin = [], WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            blocks = [BLOCKS[block](cin if b == 0 else width, width, 2 if (i > 0 and b == 0) else 1, norm, gn_groups,
                                    shortcut) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stage1, self.stage2, self.stage3 = stages
        if block == "basic":
            self.post_norm, self.post_act = nn.Identity(), nn.Identity()
        else:                          # pre-activation: the last addition is normalized once, before the pool
            self.post_norm, self.post_act = norm_relu(norm, WIDTHS[-1], gn_groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = DropoutLinear(WIDTHS[-1], num_classes, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        """Weighted layers (convs and the linear layer): 6n+2 with option A, 6n+4 with option B."""
        return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in self.modules())

    def gradcam_layers(self) -> list[nn.Module]:
        """The last 2n conv layers (stage 3, a quarter of the input size): Grad-CAM's targets."""
        return [conv for block in self.stage3 for conv in (block.conv1, block.conv2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ResNet: expected (N, C, H, W) with H and W divisible by 4, got {tuple(x.shape)}")
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.post_act(self.post_norm(self.stage3(self.stage2(self.stage1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- the ResNets people use

ARCHS = ("resnet6n2", "resnet18", "resnet34", "resnet50")
TORCHVISION_WIDTHS = {"resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512),
                      "resnet50": (64, 128, 256, 512, 1024, 2048)}


def norm_factory(norm: str, gn_groups: int = 32):
    """torchvision's `norm_layer` argument: channels -> this project's norm `norm` (any scheme)."""
    def make(channels: int) -> nn.Module:
        return make_norm(norm, channels, **_norm_options(norm, gn_groups))
    return make


def build_model(arch: str, num_classes: int, norm: str = "bn", **options) -> nn.Module:
    """A ResNet of `arch` with every norm layer `norm`.

    resnet6n2: `ResNet(n, num_classes, norm=...)` (options: n, shortcut, gn_groups, block,
    dropout, in_channels).
    resnet18 / resnet34 / resnet50: torchvision's own builders with `norm_layer` set to this
    project's norm, so BN, IN, BIN, LN, GN, nn and torch_bn all run in them; no weights are loaded
    (`weights=None`: nothing is downloaded). GN's group count (option gn_groups, 32 as in Wu & He)
    must divide every width. Option dropout puts dropout before the classifier (a
    `DropoutLinear`, so the weight names stay torchvision's). Other options go to torchvision's builder.
    """
    if arch not in ARCHS:
        raise ValueError(f"build_model: arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "resnet6n2":
        return ResNet(options.pop("n", 2), num_classes, norm=norm, **options)
    import torchvision

    gn_groups = options.pop("gn_groups", 32)
    dropout = options.pop("dropout", 0.0)
    if norm == "gn" and any(w % gn_groups for w in TORCHVISION_WIDTHS[arch]):
        raise ValueError(f"build_model: gn_groups = {gn_groups} must divide every width of {arch} "
                         f"({', '.join(map(str, TORCHVISION_WIDTHS[arch]))})")
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                              norm_layer=norm_factory(norm, gn_groups), **options)
    fc = model.fc                      # the same initial weights, in a classifier that can drop out
    model.fc = nn.utils.skip_init(DropoutLinear, fc.in_features, fc.out_features, dropout)
    model.fc.load_state_dict(fc.state_dict())
    return model


def model_from_config(config: dict) -> nn.Module:
    """The model a checkpoint's `model_config` describes (`train.model_config`); older checkpoints
    without `arch` are 6n+2 nets. `image_size` is where the model was trained, not an argument."""
    options = {k: v for k, v in config.items() if k not in ("arch", "num_classes", "norm", "image_size")}
    return build_model(config.get("arch", "resnet6n2"), config["num_classes"], config.get("norm", "bn"), **options)


def stem(model: nn.Module) -> list[nn.Module]:
    """The layers before the first stage: the first conv and, where it has one, its norm."""
    if isinstance(model, ResNet):
        return [model.conv1] + ([model.norm1] if model.block == "basic" else [])
    return [model.conv1, model.bn1]


def stages(model: nn.Module) -> list[nn.Module]:
    """The stages of residual blocks, input side first (3 in the 6n+2 net, 4 in torchvision's)."""
    if isinstance(model, ResNet):
        return [model.stage1, model.stage2, model.stage3]
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def feature_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) whose outputs are the stem's and each stage's feature maps."""
    first = model.act1 if isinstance(model, ResNet) else model.maxpool
    return [("stem", first)] + [(f"stage{i + 1}", s) for i, s in enumerate(stages(model))]


def gradcam_layers(model: nn.Module) -> list[nn.Module]:
    """Grad-CAM's targets: the convs on the main path of the last stage (in the 6n+2 net, its last 2n convs)."""
    if isinstance(model, ResNet):
        return model.gradcam_layers()
    return [m for name, m in stages(model)[-1].named_modules()
            if isinstance(m, nn.Conv2d) and "downsample" not in name]
