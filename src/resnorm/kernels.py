"""The fused CPU passes of resnorm.norms (kernels.cpp), compiled once per machine.

PyTorch's JIT extension builder compiles kernels.cpp on first use (about 20-30 seconds on
two cores, with g++ and ninja) and caches the result in ~/.cache/torch_extensions
(TORCH_EXTENSIONS_DIR). The build's name is keyed by this CPU's instruction sets, the source
and torch's version and install, and it compiles a copy of the source kept in its own build folder: a
checkout elsewhere (DVC's experiment copies in .dvc/tmp/exps) reuses it instead of rebuilding,
and an edit or a torch upgrade builds anew. A build that no longer loads (a truncated .so) is
rebuilt once. Without a C++ compiler, a writable cache, or with RESNORM_KERNELS=0,
`cpu_kernels()` is None and the norms use plain tensor ops: equal to rounding, but
rounding differs, and over a 50-epoch run that moves the metrics (the run records name
the engine, `engine()`).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]  # sqrt stays exact; errno off lets it vectorise


def _build_key() -> str:
    """A short tag of this CPU's instruction sets (the build uses -march=native, so a home
    directory shared by different machines must not hand one machine's build to another), the
    source and flags, and the torch (version and install) it compiles against."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    source = hashlib.sha1(SOURCE.read_bytes()).hexdigest()
    where = os.path.dirname(torch.__file__)       # each environment's torch headers: two venvs do not rebuild in turn
    build = f"{platform.machine()} {flags} {torch.__version__} {where} {source} {' '.join(CFLAGS)}"
    return hashlib.sha1(build.encode()).hexdigest()[:10]


NAME = f"resnorm_kernels_{_build_key()}"


def _source_in(build: Path) -> Path:
    """kernels.cpp copied into the build folder (temp file + rename): the path ninja sees is the
    same from every checkout, so a second checkout does not rebuild."""
    target = build / "kernels.cpp"
    if not target.exists() or target.read_bytes() != SOURCE.read_bytes():
        tmp = build / f".kernels.cpp.{os.getpid()}.tmp"
        tmp.write_bytes(SOURCE.read_bytes())
        os.replace(tmp, target)
    return target


@contextlib.contextmanager
def _ninja_beside_python():
    """This Python's own bin folder (a venv's) first on PATH while the kernels build, when it has a
    ninja. Two ninja versions (a venv's 1.13 and a system's 1.11, say) hash build commands
    differently, so a shell with the venv activated and one without would each find the other's
    build stale and recompile it (40-60 s) at every switch; with this, every process uses one."""
    here = Path(sys.executable).parent
    old = os.environ.get("PATH", "")
    if not (here / "ninja").exists():
        yield
        return
    os.environ["PATH"] = f"{here}{os.pathsep}{old}"
    try:
        yield
    finally:
        os.environ["PATH"] = old


def compile_module(name: str, source: Path, build_directory: str | None = None):
    """A kernels.cpp compiled with this project's flags and loaded as module `name` (also how
    bench/bench_kernels.py builds another revision's source beside today's)."""
    from torch.utils import cpp_extension
    with _ninja_beside_python():
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                                  build_directory=build_directory)


@functools.cache
def cpu_kernels():
    """The compiled module (stats, affine, grad_sums, grad_input), or None when unavailable."""
    if os.environ.get("RESNORM_KERNELS", "1") == "0":
        return None
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU
    try:
        from torch.utils import cpp_extension
        build = Path(cpp_extension._get_build_directory(NAME, verbose=False))
        source = _source_in(build)
        library = build / f"{NAME}.so"
        if not library.exists():
            print("resnorm: compiling the fused CPU kernels (once per machine, under a minute)...", file=sys.stderr)

        try:
            return compile_module(NAME, source)
        except (ImportError, OSError) as e:       # built, but will not load: rebuild once
            if not library.exists():
                raise
            print(f"resnorm: {library} does not load ({type(e).__name__}); rebuilding it", file=sys.stderr)
            library.unlink()
            return compile_module(NAME, source)
    except Exception as e:  # no compiler, no headers, a failed build: fall back, say why once
        first = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"resnorm: fused CPU kernels unavailable ({type(e).__name__}: {first}); using plain "
                      "tensor ops: slower, and rounding differs, so a run's metrics will not match one made "
                      "with the kernels (its record says which engine ran)", RuntimeWarning, stacklevel=2)
        return None


def engine(device: torch.device, threads: int, compile_mode: bool | str) -> dict:
    """What computed a run, for its record: the same parameters and data give bit-identical
    results on CPU only with the same engine (fused kernels or tensor ops) and thread count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    fused = device.type == "cpu" and compile_mode is False and cpu_kernels() is not None
    ops = "fused CPU kernels" if fused else "tensor ops"
    return {"device": name, "norm_ops": ops, "threads": threads, "compile": compile_mode,
            "torch": str(torch.__version__)}
