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
All five are one computation (`_Normalize`), told apart only by how each of their terms
pools the per-(sample, channel) statistics (`_Pool`): mean and variance per (n, c) in one
pass, pooled over samples, channel groups or not at all (exactly, without cancellation),
then one fused multiply-add (and the following ReLU, where the model fuses it); the
backward is one closed form for all of them. Two engines run it: the C++ CPU kernels
(kernels.cpp, `resnorm.kernels`) and tensor ops (GPU, torch.compile, no compiler); tests
hold both to PyTorch's own layers.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .kernels import cpu_kernels


class _Part(NamedTuple):
    """One normalized term of a layer, alpha * (x - mean) * rstd, with alpha a per-channel coefficient.

    mean and rstd are (N or 1, C); `pool` averages a per-(sample, channel) tensor over each
    group of cells that share statistics and broadcasts it back (identity for IN, over samples
    for BN, over channel groups for GN/LN); None when mean and rstd are constants (running stats).
    """
    mean: torch.Tensor
    rstd: torch.Tensor
    pool: Callable[[torch.Tensor], torch.Tensor] | None


def _part(mean: torch.Tensor, var: torch.Tensor, pool, eps: float) -> tuple[_Part, torch.Tensor]:
    """Pool per-(n, c) statistics of equal-sized cells exactly (var = mean(var) + var(means), no
    cancellation); returns the part and the pooled variance (for running statistics)."""
    if pool is _per_cell:
        m, v = mean, var
    else:
        m = pool(mean)
        d = mean - m
        v = pool(torch.addcmul(var, d, d))
    return _Part(m, torch.rsqrt(v + eps), pool), v


def _fixed(mean: torch.Tensor, var: torch.Tensor, eps: float) -> _Part:
    """A part with constant statistics (BN's running mean and variance in eval)."""
    return _Part(mean.view(1, -1), torch.rsqrt(var.view(1, -1) + eps), None)


def _scale_shift(parts, alphas, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * scale + shift: scale = sum(alpha * rstd), shift = bias - sum(alpha * rstd * mean).
    (alpha and bias are (C,) and broadcast against the (N or 1, C) statistics.)"""
    scale = shift = None
    for p, a in zip(parts, alphas):
        s = p.rstd if a is None else a * p.rstd
        scale = s if scale is None else scale + s
        if shift is None and bias is None:
            shift = -(s * p.mean)
        else:
            shift = torch.addcmul(bias if shift is None else shift, s, p.mean, value=-1)
    return scale, shift


class _Normalize(torch.autograd.Function):
    """y = x * scale + shift with (scale, shift) per (sample, channel) from the layer's parts.

    Forward: one statistics pass and one multiply-add over x. Backward, in closed form for
    any sum of parts (derivation: each part is a normalization over its groups of cells):
    the per-(n, c) sums of g and g * x (one pass) give, per part,
        d alpha = rstd * (sum(g x) - mean * sum(g))        (per cell: sum of g * x_hat)
        A = pool(alpha * mean(g)),  B = pool(alpha * rstd * (mean(g x) - mean * mean(g)))
    and grad_x = g * scale + x * c1 + c0 (one more pass) with c1 = -sum(rstd^2 B) and
    c0 = -sum(rstd A - mean rstd^2 B). The layer maps d alpha to its parameters. Only x is kept.
    """

    @staticmethod
    def forward(ctx, x, layer, kernels, *params):
        ctx.save_for_backward(x)
        ctx.layer, ctx.params = layer, params
        if kernels:                                               # CPU: the whole layer in kernels.cpp
            y, ctx.kernel_state = _kernel_forward(kernels, layer, x, params)
            return y
        ctx.kernel_state = None
        mean, var = (t if t.dtype == torch.float64 else t.double() for t in _spatial_stats(x))
        with torch.no_grad():                                     # the (N, C) arithmetic runs in float64
            parts = _parts(layer._spec(x), mean, var, layer.eps)
            alphas = layer._alphas(*params)
            scale, shift = _scale_shift(parts, alphas, params[-1])
        ctx.parts, ctx.alphas, ctx.scale, ctx.shift = parts, alphas, scale, shift
        return _affine(x, scale, shift, layer.fused_relu)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        relu, need_x = ctx.layer.fused_relu, ctx.needs_input_grad[0]
        if ctx.kernel_state is not None:
            kernels, args = ctx.kernel_state
            grad_x, d_bias, *d_alphas = kernels.norm_backward(g, x, *args, relu, need_x, False)
            return ctx.layer._finish_grads(ctx, grad_x if need_x else None, d_alphas, d_bias)
        scale, shift = ctx.scale, ctx.shift
        if relu:                                                          # the ReLU's mask, recomputed
            g = g * (_affine(x, scale, shift) > 0)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        sum_g, sum_gx = g.sum(tuple(range(2, x.dim())), dtype=acc).double(), _dot(g, x, acc).double()
        count = x.numel() // (x.shape[0] * x.shape[1])
        c1 = c0 = None
        d_alphas = []
        for p, a in zip(ctx.parts, ctx.alphas):
            gxhat = p.rstd * (sum_gx - p.mean * sum_g)                        # per cell: sum of g * x_hat
            d_alphas.append(gxhat.sum(0))
            if p.pool is not None and need_x:
                k = p.rstd / count
                r2b = k * p.rstd * p.pool(gxhat if a is None else a * gxhat)  # rstd^2 B
                t0 = p.mean * r2b - k * p.pool(sum_g if a is None else a * sum_g)
                c1, c0 = (-r2b, t0) if c1 is None else (c1 - r2b, c0 + t0)
        grad_x = None
        if need_x:
            if c1 is None:                                                    # constant statistics
                c1 = c0 = scale.new_zeros(scale.shape)
            grad_x = _affine(x, c1.expand_as(scale), c0.expand_as(scale))    # g * scale + x * c1 + c0
            grad_x.addcmul_(g, scale.view(*scale.shape, *([1] * (x.dim() - 2))).to(x.dtype))
        return ctx.layer._finish_grads(ctx, grad_x, d_alphas, sum_g.sum(0))


_KERNEL_DTYPES = (torch.float32, torch.float64)


def _kernels_for(x: torch.Tensor):
    """The compiled CPU kernels when they handle x (float32/64, contiguous or channels_last), else None.
    (Called for every layer of every step: plain attribute tests, cheapest first.)"""
    if not x.is_cpu or x.dtype not in _KERNEL_DTYPES or x.dim() < 3 or torch.compiler.is_compiling():
        return None
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None
    return cpu_kernels()


def _affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """x * scale + shift (then ReLU), with (N or 1, C) scale and shift broadcast over the map."""
    shape = (*scale.shape, *([1] * (x.dim() - 2)))
    y = torch.addcmul(shift.reshape(shape).to(x.dtype), x, scale.reshape(shape).to(x.dtype))
    return torch.relu(y) if relu else y


def _dot(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per-(n, c) sum over the spatial axes of a * b."""
    a, b = a.flatten(2), b.flatten(2)          # a view in NCHW and in channels_last
    if a.dtype != acc:
        a, b = a.to(acc), b.to(acc)
    return torch.linalg.vecdot(a, b)


def _spatial_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and biased variance over the spatial axes (the tensor-op engine).

    var = E[x^2] - mean^2 from one fused dot product (10x faster than torch.var_mean on CPU
    here); its rounding is relative to mean^2 / var, harmless for conv activations; half
    precision is accumulated in float32. (kernels.cpp accumulates in double.)
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    count = x.numel() // (x.shape[0] * x.shape[1])
    mean = x.flatten(2).sum(2, dtype=acc) / count
    var = (_dot(x, x, acc) / count - mean * mean).clamp_(min=0.0)
    return mean, var


# How a part pools its per-(n, c) statistics (the same codes as kernels.cpp's Kind)
FIXED, CELL, SAMPLES, GROUPS = 0, 1, 2, 3


class _Pool(NamedTuple):
    """A layer's recipe for one part: FIXED (given mean and variance: BN's running statistics
    in eval), CELL (IN: each (sample, channel) alone), SAMPLES (BN: each channel over the
    batch) or GROUPS (GN/LN: each sample's groups of channels). `running`, for BN in training,
    is (running_mean, running_var, factor, unbias) to update in place."""
    kind: int
    groups: int = 1
    fixed: tuple | None = None
    running: tuple | None = None


def _over_samples(t: torch.Tensor) -> torch.Tensor:
    return t.mean(0, keepdim=True)


def _per_cell(t: torch.Tensor) -> torch.Tensor:
    return t


def _over_groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """The mean over each group of channels of a sample, broadcast back to (N, C) ((N, 1) for one group)."""
    n, c = t.shape
    if groups == 1:
        return t.mean(1, keepdim=True)
    return t.view(n, groups, c // groups).mean(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)


def _update_running(running: tuple, m: torch.Tensor, v: torch.Tensor) -> None:
    """BN's running statistics (unbiased variance, as PyTorch keeps them), updated in place."""
    running_mean, running_var, factor, unbias = running
    with torch.no_grad():
        dtype = running_mean.dtype
        torch._foreach_lerp_([running_mean, running_var], [m.reshape(-1).to(dtype), (v.reshape(-1) * unbias).to(dtype)],
                             factor)


def _parts(specs: list[_Pool], mean: torch.Tensor, var: torch.Tensor, eps: float) -> list[_Part]:
    """The layer's parts from per-(n, c) statistics, with tensor ops (kernels.cpp's norm_forward
    does the same in C++ on CPU)."""
    parts = []
    for sp in specs:
        if sp.kind == FIXED:
            parts.append(_fixed(*sp.fixed, eps))
            continue
        pool = {CELL: _per_cell, SAMPLES: _over_samples}.get(sp.kind) or (lambda t, g=sp.groups: _over_groups(t, g))
        part, v = _part(mean, var, pool, eps)
        if sp.running is not None:
            _update_running(sp.running, part.mean, v)
        parts.append(part)
    return parts


_EMPTY = torch.empty(0)


def _or_empty(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t


def _kernel_args(layer, x: torch.Tensor, params) -> tuple:
    """What kernels.cpp takes for the layer: each part's kind, groups and alpha, fixed and running
    statistics, and the running statistics' factor and unbias. Built in one loop: in a training
    step this runs between convolutions that flush the caches, so every Python-level call counts."""
    specs = layer._spec(x)
    with torch.no_grad():                                 # (BIN's alphas are computed from several parameters)
        alphas = layer._alphas(*params)
    kinds, groups, alpha_args, fixed_mean, fixed_var, run_mean, run_var = [], [], [], [], [], [], []
    run = None
    for sp, a in zip(specs, alphas):
        kinds.append(sp.kind)
        groups.append(sp.groups)
        alpha_args.append(_EMPTY if a is None else a)
        fixed_mean.append(sp.fixed[0] if sp.fixed else _EMPTY)
        fixed_var.append(sp.fixed[1] if sp.fixed else _EMPTY)
        if sp.running:
            run = sp.running
        run_mean.append(sp.running[0] if sp.running else _EMPTY)
        run_var.append(sp.running[1] if sp.running else _EMPTY)
    return (kinds, groups, alpha_args, fixed_mean, fixed_var, run_mean, run_var,
            run[2] if run else 0.0, run[3] if run else 1.0)


def _kernel_forward(kernels, layer, x: torch.Tensor, params) -> tuple[torch.Tensor, tuple]:
    """The whole forward in kernels.cpp: returns y and what the backward needs (the kernels, and
    norm_backward's arguments after g and x: the float64 statistics, each part's kind, groups and
    alpha, and the bias)."""
    kinds, groups, alpha_args, fixed_mean, fixed_var, run_mean, run_var, factor, unbias = _kernel_args(layer, x, params)
    bias = _or_empty(params[-1])
    y, state = kernels.norm_forward(x, kinds, groups, alpha_args, fixed_mean, fixed_var, run_mean, run_var,
                                    factor, unbias, bias, layer.eps, layer.fused_relu)
    return y, (kernels, (state, kinds, groups, alpha_args, bias))


def _run(layer: nn.Module, x: torch.Tensor, *params) -> torch.Tensor:
    """Run a layer: the hand-written Function in eager mode when a gradient is needed; without
    one, the CPU kernels' forward alone, or plain tensor ops (on GPU, and under torch.compile,
    which then fuses statistics, affine and their backward into a few kernels itself)."""
    compiling = torch.compiler.is_compiling()
    if not compiling and torch.is_grad_enabled() and \
            (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        kernels = _kernels_for(x)
        if kernels is not None and not layer._mixes and (params[-1] is None or params[-1].dtype == x.dtype):
            # one part, weight and bias only: one C++ autograd node (kernels.cpp NormNode), the same
            # kernels as _Normalize without the engine calling back into Python for the backward,
            # and with the layer's own arguments rather than _kernel_args' lists (inline: in a
            # training step each Python call here costs microseconds, the caches being cold)
            (sp,) = layer._spec(x)
            stats = sp.fixed or sp.running or (None, None)
            factor, unbias = (sp.running[2], sp.running[3]) if sp.running else (0.0, 1.0)
            return kernels.norm_autograd(x, params[0], params[1], stats[0], stats[1], sp.kind, sp.groups, factor,
                                         unbias, layer.eps, layer.fused_relu)
        return _Normalize.apply(x, layer, kernels, *params)
    kernels = _kernels_for(x)
    if kernels:
        with torch.no_grad():
            return _kernel_forward(kernels, layer, x, params)[0]
    if compiling:
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(xs, dim=tuple(range(2, x.dim())), unbiased=False)
    else:
        mean, var = _spatial_stats(x)
    parts = _parts(layer._spec(x), mean, var, layer.eps)
    return _affine(x, *_scale_shift(parts, layer._alphas(*params), params[-1]), layer.fused_relu)


def _check_4d(x: torch.Tensor, module: nn.Module) -> None:
    if x.dim() < 3:
        raise ValueError(f"{type(module).__name__}: expected an (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != module.num_channels:
        raise ValueError(f"{type(module).__name__}: expected {module.num_channels} channels, got {x.shape[1]}")


class _Norm(nn.Module):
    """Common constructor: `num_channels`, `eps`, `momentum`, `affine` as in torch.nn.

    A scheme says how to normalize by `_spec` (how each of its normalized terms pools the
    per-(n, c) statistics), `_alphas` (each term's per-channel coefficient from the
    parameters) and `_param_grads` (the parameters' gradients from the coefficients'); the
    rest is shared, and run by kernels.cpp on CPU or by tensor ops elsewhere.
    """

    _mixes = False        # whether _alphas mixes parameters (BIN), so that _param_grads must unmix

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True):
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels, self.eps, self.momentum, self.affine = num_channels, eps, momentum, affine
        self.fused_relu = False
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(x, self)
        return _run(self, x, self.weight, self.bias)

    def fuse_relu_(self) -> "_Norm":
        """Apply a ReLU to the output in the same pass (the model's norm -> ReLU pairs); returns self."""
        self.fused_relu = True
        return self

    def _alphas(self, weight, bias) -> list:
        return [weight]

    def _param_grads(self, params, d_alphas, d_bias) -> tuple:
        return d_alphas[0], d_bias

    def _finish_grads(self, ctx, grad_x, d_alphas, d_bias) -> tuple:
        """_Normalize.backward's return value: grad_x, and the parameters' gradients in their dtype."""
        grads = self._param_grads(ctx.params, d_alphas, d_bias)
        return (grad_x, None, None, *(gr.to(p.dtype) if need else None
                                      for gr, p, need in zip(grads, ctx.params, ctx.needs_input_grad[3:])))

    def extra_repr(self) -> str:
        relu = ", fused_relu=True" if self.fused_relu else ""
        return f"{self.num_channels}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}{relu}"


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

    @property
    def _uses_batch(self) -> bool:
        return self.training or not self.track_running_stats

    def _check_batch(self, x: torch.Tensor) -> None:
        """Refuses one value per channel in training, as PyTorch does."""
        _check_4d(x, self)
        if self.training and x.numel() // x.shape[1] <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")

    def _bn_pool(self, x: torch.Tensor) -> _Pool:
        """The BN term: batch statistics (counting the batch for the running ones) in training,
        the running ones in eval."""
        buffers = self._buffers      # (not self.running_mean: nn.Module.__getattr__ costs a microsecond a name)
        if not self._uses_batch:
            return _Pool(FIXED, fixed=(buffers["running_mean"], buffers["running_var"]))
        running = None
        if self.training and self.track_running_stats:
            tracked = buffers["num_batches_tracked"]
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
            count = x.numel() // x.shape[1]
            running = (buffers["running_mean"], buffers["running_var"], factor, count / max(count - 1, 1))
        return _Pool(SAMPLES, running=running)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", track_running_stats={self.track_running_stats}"


class BatchNorm(_RunningStats):
    """BN: per-channel statistics over (N, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_batch(x)
        if self._uses_batch and torch.compiler.is_compiling():
            # under torch.compile, one (N, H, W) reduction: inductor fuses it better than pooled
            # per-(n, c) statistics (and the latter hit an inductor assertion on CUDA at 32x64 rows)
            xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            v, m = torch.var_mean(xs, dim=(0, *range(2, x.dim())), unbiased=False)
            pool = self._bn_pool(x)
            if pool.running is not None:
                _update_running(pool.running, m, v)
            part = _Part(m.view(1, -1), torch.rsqrt(v.view(1, -1) + self.eps), None)
            return _affine(x, *_scale_shift([part], [self.weight], self.bias), self.fused_relu)
        return _run(self, x, self.weight, self.bias)

    def _spec(self, x) -> list[_Pool]:
        return [self._bn_pool(x)]


class InstanceNorm(_Norm):
    """IN: per-sample, per-channel statistics over (H, W); the same in train and eval."""

    def _spec(self, x) -> list[_Pool]:
        return [_Pool(CELL)]


class GroupNorm(_Norm):
    """GN: per-sample statistics over each of `num_groups` groups of channels."""

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, num_groups: int = 4):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_groups={num_groups} must divide num_channels={num_channels}")
        super().__init__(num_channels, eps, momentum, affine)
        self.num_groups = num_groups

    def _spec(self, x) -> list[_Pool]:
        return [_Pool(GROUPS, self.num_groups)]

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
    calls it after each optimizer step, as the authors do). Both terms are affine in
    x per (sample, channel), so the whole layer is one fused multiply-add.
    """

    _mixes = True

    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, rho_init: float = 1.0):
        super().__init__(num_channels, eps, momentum, affine, track_running_stats)
        self.rho = nn.Parameter(torch.full((num_channels,), float(rho_init)))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.rho.clamp_(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_batch(x)
        return _run(self, x, self.rho, self.weight, self.bias)

    def _spec(self, x) -> list[_Pool]:
        return [self._bn_pool(x), _Pool(CELL)]

    @staticmethod
    def _gate(rho: torch.Tensor) -> torch.Tensor:
        """rho clamped to [0, 1], with the gradient passed wherever 0 <= rho <= 1, bounds included.

        torch.clamp passes none at the bounds, and rho starts at exactly 1: with it the gate
        would never leave 1 and BIN would be BN (what the authors' code avoids by clamping
        only after the optimizer step)."""
        return torch.where((rho >= 0) & (rho <= 1), rho, rho.detach().clamp(0.0, 1.0))

    def _alphas(self, rho, weight, bias) -> list:
        r = self._gate(rho)
        return [r, 1 - r] if weight is None else [weight * r, weight * (1 - r)]

    def _param_grads(self, params, d_alphas, d_bias) -> tuple:
        rho, weight, _ = params
        r = self._gate(rho)
        d_bn, d_in = d_alphas
        d_r = d_bn - d_in if weight is None else weight * (d_bn - d_in)
        d_rho = d_r * ((rho >= 0) & (rho <= 1))           # as _gate: the gradient inside [0, 1], bounds included
        d_weight = None if weight is None else r * d_bn + (1 - r) * d_in
        return d_rho, d_weight, d_bias


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
