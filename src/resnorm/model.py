"""The 6n+2-layer ResNet of He et al. 2015, section 4.2, with a pluggable normalization.

  conv3x3(16) -> [n blocks, 16 filters, S x S] -> [n blocks, 32, S/2] -> [n blocks, 64, S/4]
  -> global mean pool -> linear(r)

Each block is two 3x3 convs with a residual connection; the first block of stages
2 and 3 downsamples with a stride-2 conv and a 1x1 stride-2 projection on the
shortcut. A normalization layer follows every conv; where a ReLU follows the norm directly,
the from-scratch norms apply it in the same pass over the activation.
"""
from __future__ import annotations

import torch
from torch import nn

from .norms import make_norm

WIDTHS = (16, 32, 64)


def _norm_options(norm: str, gn_groups: int) -> dict:
    return {"num_groups": gn_groups} if norm == "gn" else {}


def norm_relu(norm: str, channels: int, gn_groups: int) -> tuple[nn.Module, nn.Module]:
    """A norm followed by a ReLU, as (norm, activation): the from-scratch norms apply the ReLU
    in their own pass (activation is then nn.Identity); others get an nn.ReLU."""
    layer = make_norm(norm, channels, **_norm_options(norm, gn_groups))
    if hasattr(layer, "fuse_relu_"):
        return layer.fuse_relu_(), nn.Identity()
    return layer, nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, gn_groups: int):
        super().__init__()
        opts = _norm_options(norm, gn_groups)
        bias = norm == "nn"            # without a norm's affine shift, convs keep their own bias
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=bias)
        self.norm1, self.act1 = norm_relu(norm, out_channels, gn_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=bias)
        self.norm2 = make_norm(norm, out_channels, **opts)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                                          make_norm(norm, out_channels, **opts))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with 6n+2 weighted layers and `num_classes` outputs; any input size divisible by 4."""

    def __init__(self, n: int, num_classes: int, norm: str = "bn", in_channels: int = 3, gn_groups: int = 4):
        super().__init__()
        if n < 1:
            raise ValueError(f"ResNet: n must be >= 1, got {n}")
        if num_classes < 1:
            raise ValueError(f"ResNet: num_classes must be >= 1, got {num_classes}")
        self.n, self.num_classes, self.norm = n, num_classes, norm
        bias = norm == "nn"
        self.conv1 = nn.Conv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=bias)
        self.norm1, self.act1 = norm_relu(norm, WIDTHS[0], gn_groups)
        stages, cin = [], WIDTHS[0]
        for i, width in enumerate(WIDTHS):
            blocks = [BasicBlock(cin if b == 0 else width, width, 2 if (i > 0 and b == 0) else 1, norm, gn_groups)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(WIDTHS[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def depth(self) -> int:
        return 6 * self.n + 2

    def gradcam_layers(self) -> list[nn.Module]:
        """The last 2n conv layers (stage 3, a quarter of the input size): Grad-CAM's targets."""
        return [conv for block in self.stage3 for conv in (block.conv1, block.conv2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ResNet: expected (N, C, H, W) with H and W divisible by 4, got {tuple(x.shape)}")
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
