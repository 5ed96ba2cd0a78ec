"""ResNet (6n+2) with from-scratch normalization layers.

Stage commands run the code of their own checkout. `pip install -e .` points `import resnorm`
at the main workspace's src/, but `dvc exp run --queue` and `--temp` run each experiment in a
copy (.dvc/tmp/exps/...) whose src/ DVC hashes into that experiment's dvc.lock. So when the
working directory holds its own src/resnorm, the package's submodules are loaded from there:
editing src/ in the main workspace while the queue runs changes nothing the queued runs
execute. Only DVC's own experiment copies (.../.dvc/tmp/exps/...) are redirected: elsewhere
the installed src/ is the checkout, and one source path keeps the C++ kernels' JIT build
cached (torch rebuilds it, about 30 s, whenever the source path changes).
"""
from pathlib import Path as _Path

_here = _Path(__file__).resolve().parent
_local = _Path.cwd() / "src" / "resnorm"
if ("/.dvc/tmp/exps/" in _Path.cwd().as_posix() + "/" and _local.is_dir()
        and (_local / "train.py").is_file() and _local.resolve() != _here):
    __path__ = [str(_local.resolve())]        # noqa: F821 (the package's module search path)
del _Path, _here, _local
