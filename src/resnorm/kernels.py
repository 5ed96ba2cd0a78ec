"""The fused CPU passes of resnorm.norms (kernels.cpp), compiled once per machine.

PyTorch's JIT extension builder compiles kernels.cpp on first use (about 20-30 seconds on
two cores, with g++ and ninja) and caches the result in ~/.cache/torch_extensions
(TORCH_EXTENSIONS_DIR), under a name keyed by this CPU's instruction sets and rebuilt when
the source changes, so later processes load it in milliseconds. Without a C++ compiler, or with
RESNORM_KERNELS=0, `cpu_kernels()` is None and the norms use plain tensor ops: the same
results to rounding, only slower.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: the build uses -march=native, so a home
    directory shared by different machines must not hand one machine's build to another."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


NAME = f"resnorm_kernels_{_cpu_tag()}"


@functools.cache
def cpu_kernels():
    """The compiled module (stats, affine, grad_sums, grad_input), or None when unavailable."""
    if os.environ.get("RESNORM_KERNELS", "1") == "0":
        return None
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU
    try:
        from torch.utils import cpp_extension
        try:
            built = (Path(cpp_extension._get_build_directory(NAME, verbose=False)) / f"{NAME}.so").exists()
        except Exception:
            built = True
        if not built:
            print("resnorm: compiling the fused CPU kernels (once per machine, under a minute)...", file=sys.stderr)
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
                                  extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no headers, a failed build: fall back, say why once
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"resnorm: fused CPU kernels unavailable ({type(e).__name__}: {first}); "
                      "using plain tensor ops (same results, slower)", RuntimeWarning, stacklevel=2)
        return None
