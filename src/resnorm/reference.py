"""The five normalizations as their textbook formulas: plain autograd, a few lines each.

Read these first. `resnorm.norms` computes exactly the same functions faster (one
statistics pass, one fused multiply-add, a hand-written backward, C++ kernels on CPU),
and the tests hold it to these modules as well as to PyTorch's own layers.

Every scheme is  y = weight * (x - mean) / sqrt(var + eps) + bias,  with the biased
variance, a per-channel affine, and the statistics taken over:

  BN   (N, H, W)          per channel; running averages replace them in eval
  IN   (H, W)             per sample and channel
  LN   (C, H, W)          per sample
  GN   (C/G, H, W)        per sample and group of C/G channels
  BIN  rho * BN-normalized + (1 - rho) * IN-normalized, rho in [0, 1] per channel
"""
from __future__ import annotations

import torch
from torch import nn


def standardize(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and biased variance over `dims`."""
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


class _Affine(nn.Module):
    """A per-channel weight (ones) and bias (zeros), as every torch.nn norm has."""

    def __init__(self, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def affine(self, x_hat: torch.Tensor) -> torch.Tensor:
        return self.weight.view(1, -1, 1, 1) * x_hat + self.bias.view(1, -1, 1, 1)


class BatchNorm(_Affine):
    """BN: statistics per channel over the batch and the map; running mean and unbiased variance for eval."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(num_channels, eps)
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_channels))
        self.register_buffer("running_var", torch.ones(num_channels))

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            mean, var = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
            return (x - mean) / torch.sqrt(var + self.eps)
        dims = (0, 2, 3)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * x.mean(dims))
            self.running_var.mul_(1 - m).add_(m * x.var(dims, unbiased=True))
        return standardize(x, dims, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(self.normalized(x))


class InstanceNorm(_Affine):
    """IN: statistics per sample and channel over the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(standardize(x, (2, 3), self.eps))


class LayerNorm(_Affine):
    """LN: statistics per sample over all channels and the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine(standardize(x, (1, 2, 3), self.eps))


class GroupNorm(_Affine):
    """GN: reshape to (N, G, C/G * H * W), standardize each row, reshape back, then the affine."""

    def __init__(self, num_channels: int, num_groups: int = 4, eps: float = 1e-5):
        super().__init__(num_channels, eps)
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.reshape(n, self.num_groups, c // self.num_groups * h * w)
        return self.affine(standardize(rows, (2,), self.eps).reshape(n, c, h, w))


class BatchInstanceNorm(BatchNorm):
    """BIN: a per-channel gate rho (clamped to [0, 1]) mixes the BN- and IN-normalized x, then the affine.

    (torch.clamp passes no gradient at 0 or 1; the fast layer does, so that a gate that
    starts at 1 can move: see `norms.BatchInstanceNorm._gate`.)"""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1, rho_init: float = 1.0):
        super().__init__(num_channels, eps, momentum)
        self.rho = nn.Parameter(torch.full((num_channels,), float(rho_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rho = self.rho.clamp(0, 1).view(1, -1, 1, 1)
        return self.affine(rho * self.normalized(x) + (1 - rho) * standardize(x, (2, 3), self.eps))


REFERENCE = {"bn": BatchNorm, "in": InstanceNorm, "bin": BatchInstanceNorm, "ln": LayerNorm, "gn": GroupNorm}
