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
All five share one path (`_AffineByStats`): per-(sample, channel) mean and variance in
one pass, pooled over batch, groups or channels as the scheme asks (exactly, without
cancellation), then a single fused multiply-add; the backward is written out.
"""
from __future__ import annotations

import torch
from torch import nn


class _AffineByStats(torch.autograd.Function):
    """y = x * scale + shift, where (scale, shift) per (sample, channel) are a function of the
    per-(sample, channel) spatial mean and variance of x and of the layer's parameters.

    Every scheme here fits this form, BIN included, so each layer costs one statistics
    pass and one fused multiply-add over the activation in the forward pass. The backward
    pass needs only the two per-(sample, channel) sums of g and g * x: the gradients of
    the small (N, C) statistics are found by autograd on the small graph `stats_fn`
    built in forward, and the activation gradient is one more multiply-add,
    g * scale + x * c1 + c0. Only x is kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, x, stats_fn, *params):
        dims = tuple(range(2, x.dim()))
        mean, var = _spatial_stats(x)                                      # (N, C), one pass
        with torch.enable_grad():
            leaves = [mean.requires_grad_(), var.requires_grad_()]
            small = [None if p is None else p.detach().requires_grad_(p.requires_grad) for p in params]
            scale, shift = stats_fn(leaves[0], leaves[1], *small)            # (N or 1, C)
        ctx.save_for_backward(x)
        ctx.graph = (leaves, small, scale, shift, dims)
        return _affine(x, scale.detach(), shift.detach())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        (mean, var), small, scale, shift, dims = ctx.graph
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        sum_g = g.sum(dims, dtype=acc)                                      # dL/dshift per (n, c)
        sum_gx = _dot(g, x, acc)                                            # dL/dscale per (n, c)
        if scale.shape[0] != x.shape[0]:                                    # (1, C): shared over samples
            sum_g, sum_gx = sum_g.sum(0, keepdim=True), sum_gx.sum(0, keepdim=True)
        wanted = [mean, var] + [p for p in small if p is not None and p.requires_grad]
        grads = torch.autograd.grad((scale, shift), wanted, (sum_gx, sum_g), allow_unused=True, retain_graph=True)
        d_mean, d_var = (torch.zeros_like(mean) if d is None else d for d in grads[:2])
        count = x[0, 0].numel()
        c1 = d_var * (2.0 / count)                                          # d var / dx = 2 (x - mean) / count
        c0 = d_mean / count - c1 * mean.detach()
        grad_x = _affine(x, c1, c0)
        grad_x.addcmul_(g, scale.detach().view(*scale.shape, *([1] * len(dims))).to(x.dtype))
        it = iter(grads[2:])
        grad_params = [None if p is None or not p.requires_grad else next(it) for p in small]
        return (grad_x, None, *grad_params)


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift in one pass, with (N or 1, C) scale and shift broadcast over the map."""
    shape = (*scale.shape, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))


def _dot(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per-(n, c) sum over the spatial axes of a * b, without materialising a * b."""
    a, b = a.flatten(2), b.flatten(2)          # a view in NCHW and in channels_last
    if a.dtype != acc:
        a, b = a.to(acc), b.to(acc)
    return torch.linalg.vecdot(a, b)


def _spatial_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and biased variance over the spatial axes.

    var = E[x^2] - mean^2 from one fused dot product: on this CPU it is 10x faster than
    torch.var_mean (whose Welford loop is not vectorised for this layout). Rounding is
    relative to mean^2 / var, harmless for conv activations; half-precision inputs are
    accumulated in float32.
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    count = x[0, 0].numel()
    mean = x.flatten(2).sum(2, dtype=acc) / count
    var = (_dot(x, x, acc) / count - mean * mean).clamp_(min=0.0)
    return mean, var


def _pool(mean: torch.Tensor, var: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of equal-sized parts pooled along `dim`: var = mean(var) + var(means), no cancellation."""
    m = mean.mean(dim, keepdim=True)
    return m, var.mean(dim, keepdim=True) + (mean - m).pow(2).mean(dim, keepdim=True)


def _scale_shift(mean, var, eps, weight, bias):
    """Per-(n, c) scale and shift that normalize with (mean, var) and apply the affine."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    return scale, (shift + bias if bias is not None else shift)


def _apply(x: torch.Tensor, stats_fn, *params) -> torch.Tensor:
    """Run the layer: the hand-written Function in eager mode, plain differentiable ops when
    no gradient is needed or under torch.compile (which then fuses statistics, affine and
    their backward into a few kernels itself)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and torch.is_grad_enabled() and \
            (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return _AffineByStats.apply(x, stats_fn, *params)
    if compiling:
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(xs, dim=tuple(range(2, x.dim())), unbiased=False)
    else:
        mean, var = _spatial_stats(x)
    return _affine(x, *stats_fn(mean, var, *params))


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

    def _check_batch(self, x: torch.Tensor) -> bool:
        """True when batch statistics are used; refuses one value per channel in training, as PyTorch does."""
        use_batch = self.training or not self.track_running_stats
        if self.training and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")
        return use_batch

    def _batch_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int):
        """Per-channel batch statistics from per-(n, c) ones; updates the running statistics."""
        m, v = _pool(mean, var, 0)
        self._update_running(m, v, count)
        return m, v

    def _update_running(self, m: torch.Tensor, v: torch.Tensor, count: int) -> None:
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(m.detach().flatten().to(self.running_mean.dtype), f)
                unbiased = v.detach().flatten() * (count / max(count - 1, 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)

    def _running(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.running_mean.view(1, -1), self.running_var.view(1, -1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", track_running_stats={self.track_running_stats}"


class BatchNorm(_RunningStats):
    """BN: per-channel statistics over (N, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        use_batch = self._check_batch(x)
        count = x.numel() // x.shape[1]

        if use_batch and torch.compiler.is_compiling():
            # under torch.compile, one (N, H, W) reduction: inductor fuses it better than pooled
            # per-(n, c) statistics (and the latter hit an inductor assertion on CUDA at 32x64 rows)
            xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            v, m = torch.var_mean(xs, dim=(0, *range(2, x.dim())), unbiased=False)
            self._update_running(m, v, count)
            scale, shift = _scale_shift(m, v, self.eps, self.weight, self.bias)
            return _affine(x, scale.view(1, -1), shift.view(1, -1))

        def stats(mean, var, w, b):
            m, v = self._batch_stats(mean, var, count) if use_batch else self._running()
            return _scale_shift(m, v, self.eps, w, b)
        return _apply(x, stats, self.weight, self.bias)


class InstanceNorm(_Norm):
    """IN: per-sample, per-channel statistics over (H, W); the same in train and eval."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return _apply(x, lambda mean, var, w, b: _scale_shift(mean, var, self.eps, w, b), self.weight, self.bias)


class GroupNorm(_Norm):
    """GN: per-sample statistics over each of `num_groups` groups of channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, num_groups: int = 4):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        super().__init__(num_channels, eps, momentum, affine)
        self.num_groups = num_groups

    def _group_stats(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = mean.shape
        m, v = _pool(mean.view(n, self.num_groups, -1), var.view(n, self.num_groups, -1), 2)
        return m.expand(n, self.num_groups, c // self.num_groups).reshape(n, c), \
            v.expand(n, self.num_groups, c // self.num_groups).reshape(n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return _apply(x, lambda mean, var, w, b: _scale_shift(*self._group_stats(mean, var), self.eps, w, b),
                      self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"


class LayerNorm(GroupNorm):
    """LN: per-sample statistics over (C, H, W) with a per-channel affine (GN with one group)."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__(num_channels, eps, momentum, affine, num_groups=1)

    def extra_repr(self) -> str:
        return _Norm.extra_repr(self)


class BatchInstanceNorm(_RunningStats):
    """BIN: rho * BN(x) + (1 - rho) * IN(x), then one per-channel affine.

    rho is a learnable per-channel gate, initialised to 1 (pure BN) as in the
    authors' code, and clamped to [0, 1] in the forward pass, so the mix is always
    a convex combination; `clamp_()` also clamps the stored value (the train loop
    calls it after each optimizer step, as the authors do). Both parts are affine in
    x per (sample, channel), so the whole layer is one fused multiply-add.
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
        use_batch = self._check_batch(x)
        count = x.numel() // x.shape[1]

        def stats(mean, var, rho, w, b):
            bm, bv = self._batch_stats(mean, var, count) if use_batch else self._running()
            bs, bsh = _scale_shift(bm, bv, self.eps, None, None)      # BN part: x * bs + bsh
            is_, ish = _scale_shift(mean, var, self.eps, None, None)  # IN part: x * is_ + ish
            r = rho.clamp(0.0, 1.0)
            scale, shift = r * bs + (1 - r) * is_, r * bsh + (1 - r) * ish
            if w is not None:
                scale, shift = scale * w, shift * w + b
            return scale, shift
        return _apply(x, stats, self.rho, self.weight, self.bias)


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


def bin_layers(model: nn.Module) -> list[BatchInstanceNorm]:
    """The BIN layers of a model, found once so the train loop need not walk the model every step."""
    return [m for m in model.modules() if isinstance(m, BatchInstanceNorm)]


def clamp_gates_(model_or_layers) -> None:
    """Keep every BIN gate in [0, 1]; call after each optimizer step (a model or `bin_layers(model)`)."""
    layers = bin_layers(model_or_layers) if isinstance(model_or_layers, nn.Module) else model_or_layers
    for m in layers:
        m.clamp_()
