"""Normalization layers written from tensor operations, with PyTorch's constructor shape.

Every scheme normalizes x to zero mean and unit (biased) variance over some axes,
then applies a per-channel affine `weight * x_hat + bias`:

  BN   over (N, H, W) per channel, running statistics for eval   (Ioffe & Szegedy 2015)
  IN   over (H, W) per sample and channel                         (Ulyanov et al. 2016)
  BIN  rho * BN + (1 - rho) * IN, rho in [0, 1] learned per channel (Nam & Kim 2018)
  LN   over (C, H, W) per sample                                  (Ba et al. 2016)
  GN   over (C/G, H, W) per sample and group                      (Wu & He 2018)
  NN   identity; torch_bn is PyTorch's own nn.BatchNorm2d (the reference)

None of them calls torch's batch_norm / group_norm / layer_norm / instance_norm kernels.
The statistics are computed in one pass (`torch.var_mean`) and the normalization,
affine and its backward are fused in `_normalize`, a hand-written autograd Function
that keeps only x_hat and 1/std for the backward pass.
"""
from __future__ import annotations

import torch
from torch import nn


class _Normalize(torch.autograd.Function):
    """y = (x - mean) * rstd * w + b, statistics over `dims`, with its backward written out.

    Saving x_hat and rstd (not x, mean, var and the intermediate tensors autograd
    would keep) halves the memory traffic of the backward pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, dims, eps):
        var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        x_hat = (x - mean) * rstd
        ctx.dims = dims
        ctx.save_for_backward(x_hat, rstd, weight)
        y = x_hat * weight + bias if weight is not None else x_hat
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x_hat, rstd, weight = ctx.saved_tensors
        dims = ctx.dims
        grad_w = grad_b = None
        if weight is not None:
            bdims = [d for d in range(grad_y.dim()) if weight.shape[d] == 1]
            if ctx.needs_input_grad[1]:
                grad_w = (grad_y * x_hat).sum(dim=bdims, keepdim=True)
            if ctx.needs_input_grad[2]:
                grad_b = grad_y.sum(dim=bdims, keepdim=True)
            g = grad_y * weight
        else:
            g = grad_y
        # d/dx of normalization: rstd * (g - mean(g) - x_hat * mean(g * x_hat)) over the stat axes
        mean_g = g.mean(dim=dims, keepdim=True)
        mean_gx = (g * x_hat).mean(dim=dims, keepdim=True)
        grad_x = (g - mean_g - x_hat * mean_gx) * rstd
        return grad_x, grad_w, grad_b, None, None


def _normalize(x: torch.Tensor, dims: tuple[int, ...], eps: float,
               weight: torch.Tensor | None, bias: torch.Tensor | None):
    """Normalize over `dims` and apply the (broadcastable) affine; returns y, mean, var."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _Normalize.apply(x, weight, bias, dims, eps)
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    return (y * weight + bias if weight is not None else y), mean, var


def _channel_view(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if p is None else p.view(1, -1, *([1] * (x.dim() - 2)))


def _check_4d(x: torch.Tensor, module: nn.Module) -> None:
    if x.dim() < 3:
        raise ValueError(f"{type(module).__name__}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != module.num_channels:
        raise ValueError(f"{type(module).__name__}: expected {module.num_channels} channels, got {x.shape[1]}")


class _Norm(nn.Module):
    """Common constructor: `num_channels`, `eps`, `momentum`, `affine` as in torch.nn."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels, self.eps, self.momentum, self.affine = num_channels, eps, momentum, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class _RunningStats(_Norm):
    """Batch statistics in training, kept as running mean/var (unbiased, like PyTorch) for eval."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_channels, eps, momentum, affine)
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels))
            self.register_buffer("running_var", torch.ones(num_channels))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def _batch_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        dims = (0, *range(2, x.dim()))
        count = x.numel() // x.shape[1]
        if self.training and count <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")
        return dims

    @torch.no_grad()
    def _update(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        if not (self.training and self.track_running_stats):
            return
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var.flatten() * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), m)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)

    def _bn(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        """Batch-normalized x (with the given affine) in training, running-statistics form in eval."""
        if self._use_batch_stats():
            y, mean, var = _normalize(x, self._batch_dims(x), self.eps, weight, bias)
            self._update(mean, var, x.numel() // x.shape[1])
            return y
        scale = torch.rsqrt(self.running_var + self.eps)
        shift = -self.running_mean * scale
        if weight is not None:
            scale, shift = scale * weight.flatten(), shift * weight.flatten() + bias.flatten()
        return x * _channel_view(scale, x) + _channel_view(shift, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", track_running_stats={self.track_running_stats}"


class BatchNorm(_RunningStats):
    """BN: per-channel statistics over (N, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return self._bn(x, _channel_view(self.weight, x), _channel_view(self.bias, x))


class InstanceNorm(_Norm):
    """IN: per-sample, per-channel statistics over (H, W); the same in train and eval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return _normalize(x, tuple(range(2, x.dim())), self.eps,
                          _channel_view(self.weight, x), _channel_view(self.bias, x))[0]


class LayerNorm(_Norm):
    """LN: per-sample statistics over (C, H, W) with a per-channel affine, so any image size works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return _normalize(x, tuple(range(1, x.dim())), self.eps,
                          _channel_view(self.weight, x), _channel_view(self.bias, x))[0]


class GroupNorm(_Norm):
    """GN: per-sample statistics over each of `num_groups` groups of channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, num_groups: int = 4):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        super().__init__(num_channels, eps, momentum, affine)
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        n, c = x.shape[:2]
        g = self.num_groups
        grouped = x.reshape(n, g, c // g, *x.shape[2:])
        w = None if self.weight is None else self.weight.view(1, g, c // g, *([1] * (x.dim() - 2)))
        b = None if self.bias is None else self.bias.view(1, g, c // g, *([1] * (x.dim() - 2)))
        y = _normalize(grouped, tuple(range(2, grouped.dim())), self.eps, w, b)[0]
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"


class BatchInstanceNorm(_RunningStats):
    """BIN: rho * BN(x) + (1 - rho) * IN(x), then one per-channel affine.

    rho is a learnable per-channel gate, initialised to 1 (pure BN) as in the
    authors' code, and clamped to [0, 1] in the forward pass, so the mix is always
    a convex combination; `clamp_()` also clamps the stored value (the train loop
    calls it after each optimizer step, as the authors do).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, rho_init: float = 1.0):
        super().__init__(num_channels, eps, momentum, affine, track_running_stats)
        self.rho = nn.Parameter(torch.full((num_channels,), float(rho_init)))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.rho.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        x_bn = self._bn(x, None, None)
        x_in = _normalize(x, tuple(range(2, x.dim())), self.eps, None, None)[0]
        rho = _channel_view(self.rho.clamp(0.0, 1.0), x)
        y = x_in + rho * (x_bn - x_in)
        if self.weight is not None:
            y = y * _channel_view(self.weight, x) + _channel_view(self.bias, x)
        return y


class NoNorm(nn.Identity):
    """NN: no normalization, the baseline; takes (and ignores) the common constructor arguments."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__()
        self.num_channels = num_channels


NORMS: dict[str, type[nn.Module]] = {
    "bn": BatchNorm,
    "in": InstanceNorm,
    "bin": BatchInstanceNorm,
    "ln": LayerNorm,
    "gn": GroupNorm,
    "nn": NoNorm,
    "torch_bn": nn.BatchNorm2d,
}


def make_norm(name: str, num_channels: int, **options) -> nn.Module:
    """Build the norm registered under `name` for `num_channels` channels."""
    try:
        cls = NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; known: {', '.join(NORMS)}") from None
    return cls(num_channels, **options)


def clamp_gates_(model: nn.Module) -> None:
    """Keep every BIN gate in [0, 1]; call after each optimizer step."""
    for m in model.modules():
        if isinstance(m, BatchInstanceNorm):
            m.clamp_()
