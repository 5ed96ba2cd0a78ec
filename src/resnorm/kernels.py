"""The fused CPU passes of resnorm.norms (kernels.cpp), compiled once per machine.

PyTorch's JIT extension builder compiles kernels.cpp on first use (about a minute on two
cores) and caches the result in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR), keyed
by the source, so later processes load it in milliseconds. Without a C++ compiler, or with
RESNORM_KERNELS=0, `cpu_kernels()` is None and the norms use plain tensor ops: the same
results to rounding, only slower.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")


@functools.cache
def cpu_kernels():
    """The compiled module (stats, affine, grad_sums, grad_input), or None when unavailable."""
    if os.environ.get("RESNORM_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load
        return load(name="resnorm_kernels", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers, a failed build: fall back, say why once
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"resnorm: fused CPU kernels unavailable ({type(e).__name__}: {first}); "
                      "using plain tensor ops (same results, slower)", RuntimeWarning, stacklevel=2)
        return None
