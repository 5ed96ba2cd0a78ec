"""Shared I/O: atomic writes (temp file + rename) and the one-line-error CLI wrapper."""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape



def _process_start() -> float:
    """When this interpreter started (Linux /proc), so stage times include the imports."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return time.time()


_START = _process_start()

console = Console(stderr=True, highlight=False)


class UserError(Exception):
    """Bad input the user can fix; printed as one line, no traceback."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    """The temp name's prefix: the target's name, cut so that prefix + random part + .tmp stays
    within the 255 bytes a file name may have (a 255-character class name is a valid folder)."""
    return f".{os.fsencode(path.name)[:120].decode('utf-8', 'ignore')}."


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename, with the
    permissions the umask gives a new file (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())                 # mkdtemp's are 0700
        if path.exists():
            old = path.with_name(_temp_prefix(path) + "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Stable, reviewable JSON: fixed key order as given, 2-space indent, trailing newline."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    columns = columns or (list(rows[0]) if rows else [])
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def append_csv(path: str | Path, row: dict[str, Any], columns: list[str]) -> None:
    """One row at the end of a CSV log (header first when the file is new); for untracked logs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


STAGE_TIMES = Path("logs/stage_times.tsv")


def no_options(argv: list[str], stage: str, doc: str, settings: str) -> None:
    """The command line of a stage whose every knob is in params.yaml: `--help` says what it does
    and which keys set it; any other argument exits 2 in one line instead of being ignored."""
    argparse.ArgumentParser(prog=f"python -m resnorm.{stage}", description=doc.split("\n")[0],
                            epilog=f"It takes no options: its settings are {settings} in params.yaml, and "
                                   f"`dvc repro {stage}` runs it when they or its inputs change.").parse_args(argv)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a bad value exits 2 with one line naming the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: at least 1")
    return value


def run_cli(main: Callable[[list[str]], Any], stage: bool = True) -> None:
    """Run a stage's main; user errors become one red line and exit status 2.

    The wall time of each successful stage (from interpreter start, imports included)
    is appended to logs/stage_times.tsv, which `python -m resnorm.times` prints; `stage=False`
    for a command that is not a stage (it would count its stages twice).
    """
    from .params import ParamError

    try:
        main(sys.argv[1:])
        if not stage:
            return
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name.removeprefix("resnorm.") if spec else Path(sys.argv[0]).stem
        STAGE_TIMES.parent.mkdir(parents=True, exist_ok=True)
        with open(STAGE_TIMES, "a", encoding="utf-8") as f:
            f.write(f"{time.time():.0f}\t{module} {' '.join(sys.argv[1:])}\t{time.time() - _START:.2f}\n")
    except (UserError, ParamError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)   # paths may hold [ ]
        sys.exit(2)
    except OSError as e:            # disk full, a read-only folder, ...: one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        console.print(f"[red]error:[/red] {escape(where + (e.strerror or str(e)))}; nothing written before "
                      "this was lost (outputs are replaced whole)", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: completed work is kept; run again to resume")
        sys.exit(130)


def save_figure(fig, path: str | Path, dpi: int = 80) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
