"""Train the pipeline's stale runs several at a time, then let `dvc repro` do the rest.

  python -m resnorm.parallel -j 4                  # every stale training stage, 4 at once
  python -m resnorm.parallel -j 8 'study-train@gn-*'   # only those (fnmatch patterns)
  python -m resnorm.parallel -j 4 --dry            # what would run, and where
  python -m resnorm.parallel -j 8 -S train.device=cuda -S train.epochs=50   # params.yaml edited first,
                                                   # as `dvc exp run -S` edits it (DVC's own parser)

`dvc repro` runs one stage at a time (DVC has no parallel repro: treeverse/dvc#755), and
one 6n+2 ResNet leaves most of a GPU idle. This module keeps `dvc.yaml` and `dvc.lock` the
single truth and only adds concurrency:

1. it holds DVC's repository lock throughout, so no other `dvc repro` interleaves;
2. it brings the training stages' upstream stages up to date (`prepare`, ...) with DVC itself;
3. it asks DVC which training stages (those whose command runs `resnorm.train`) are stale,
   and runs exactly their `cmd` from `dvc.yaml`, `-j` at a time, each pinned to one GPU
   (slot k on GPU k mod the GPU count; every GPU of a multi-GPU machine is used);
4. as each run ends well, it records it with `dvc commit` (deps, params and outputs
   hashed into `dvc.lock`, outputs cached), exactly what `dvc repro` would have written;
5. then it runs `dvc repro` for everything else (evaluate, gradcam, report), where the
   committed training stages are up to date and are skipped.

A run that fails is not committed and is named with the line of its log that says why; the others
go on. A run that runs out of GPU memory beside others starts again later, with one fewer at once
from then on. With --stall-after SECONDS, a run that writes nothing to its log that long (a hung
process: a training writes a line an epoch) is stopped and counted as failed.
Stopped midway (Ctrl-C, SIGTERM, SIGHUP), it stops the runs still going and waits for them
before it releases DVC's lock; nothing is lost: committed runs stay committed, and a training
started again resumes from its last epoch. Each run's output goes to `.dvc/tmp/parallel/<stage>.log`.
"""
from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from .io import UserError, console, positive_int, read_csv, run_cli
from .params import load_params

LOGS = Path(".dvc/tmp/parallel")


@dataclass
class Job:
    stage: str         # DVC address, e.g. study-train@gn-bs8-es-1
    cmd: str
    wdir: str
    log: Path
    gpu: str | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0
    epochs: int = 0    # the run's epoch budget (0: not known); early stopping may end it sooner
    attempts: int = 0  # starts so far (a run that ran out of GPU memory is started again)
    stalled: float = 0.0   # when it was stopped for writing nothing to its log for too long (0: never)
    threads: int = 1   # the run's CPU threads (train.threads)


def run_of(cmd: str) -> tuple[str | None, int | None]:
    """(variant, seed) of a `resnorm.train` command; (None, None) for the single experiment."""
    m = re.search(r"--variant[ =](\S+)\s+--seed[ =](\d+)", cmd)
    return (m.group(1), int(m.group(2))) if m else (None, None)


def train_settings(params, cmd: str):
    """The `train` settings of a `resnorm.train` command's run; None where its variant is not in params.yaml."""
    from .params import ParamError
    from .train import select
    try:
        return select(params, run_of(cmd)[0]).train
    except ParamError:
        return None


def job_for(stage, params) -> Job:
    """A training stage's run, its variant resolved once: the epochs it may train (0 where its
    variant is not in params.yaml: no bound; early stopping may end it sooner) and its CPU threads."""
    t = train_settings(params, stage.cmd)
    return Job(stage.addressing, stage.cmd, stage.wdir, LOGS / f"{stage.addressing.replace('@', '_')}.log",
               epochs=t.epochs if t else 0, threads=(t or params.train).threads)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def wait_policy(jobs: list[Job], slots: int, cores: int) -> dict[str, str]:
    """OMP_WAIT_POLICY=PASSIVE for the runs when those that may run at once have more CPU threads than
    there are cores, unless the environment sets a policy. OpenMP threads spin while they wait for
    work; oversubscribed, they spin on the cores the others need. Measured through resnorm.parallel on
    2 cores (the 6 gn-bs32 and gn-bs32-es runs, 6 epochs at 32 px, 2 threads each): -j 1 39 s, -j 2
    281 s, -j 2 passive 32-35 s, the histories bit-identical. The thread count, and so every sum, is
    unchanged."""
    if "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"} if threads_at_once(jobs, slots) > cores else {}


def threads_at_once(jobs: list[Job], slots: int) -> int:
    """The most CPU threads `slots` of the runs may have at once (the runs with the most)."""
    return sum(sorted((j.threads for j in jobs), reverse=True)[:slots])


def epochs_done(job: Job) -> tuple[int, float] | None:
    """(epochs finished, seconds of the last one) from the run's timing log (logs/timing/, which
    resnorm.train appends to after each epoch); None before an epoch of this start has ended (a
    log last written before it is an earlier run's, or a resumed one's earlier epochs)."""
    from .train import run_paths
    try:
        log = Path(job.wdir) / run_paths(*run_of(job.cmd)).timing
        if log.stat().st_mtime < job.started:
            return None
        rows = read_csv(log)
        return int(rows[-1]["epoch"]), float(rows[-1]["epoch_seconds"])
    except (OSError, IndexError, KeyError, ValueError):
        return None


def status_line(running: list[Job], done: int, waiting: list[Job], slots: int, failed: int = 0) -> str:
    """Where the runs stand: each running one's epoch, the counts, and a rough time left if no run
    stops early: the epochs still to go in the epoch budgets, at each running run's last epoch time
    and, for the waiting ones, at the mean of those, shared among the slots (but never less than
    the longest running run still needs)."""
    parts, left, longest, per_epoch = [], 0.0, 0.0, []
    for job in running:
        name = job.stage.split("@")[-1]
        seen = epochs_done(job)
        if seen is None:
            parts.append(f"{name} starting")
            continue
        epoch, seconds = seen
        parts.append(f"{name} epoch {epoch}" + (f"/{job.epochs}" if job.epochs else ""))
        per_epoch.append(seconds)
        left += max(job.epochs - epoch, 0) * seconds
        longest = max(longest, max(job.epochs - epoch, 0) * seconds)
    line = (f"{len(running)} running ({', '.join(parts)}); {done} done, "
            + (f"{failed} failed, " if failed else "") + f"{len(waiting)} waiting")
    if per_epoch and all(j.epochs for j in running + waiting):
        left += sum(j.epochs for j in waiting) * statistics.fmean(per_epoch)
        left = max(left / slots, longest)
        line += "; about " + (f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min" if left < 5400
                              else f"{left / 3600:.1f} h") + " left if no run stops early"
    return line


def is_training(stage) -> bool:
    cmd = stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd or [])
    return "resnorm.train" in cmd


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every one torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def plan(repo, patterns: list[str]) -> tuple[list, list]:
    """(upstream stages to bring up to date first, the training stages the patterns select)."""
    import networkx as nx
    stages = [s for s in repo.index.stages if is_training(s)]
    if patterns:
        stages = [s for s in stages if any(fnmatch.fnmatchcase(s.addressing, p) for p in patterns)]
        if not stages:
            raise UserError(f"no training stage matches {' '.join(patterns)}; "
                            f"see `dvc stage list` for the names")
    graph = repo.index.graph                 # edges run from a stage to the stages it depends on
    upstream = set().union(*(nx.descendants(graph, s) for s in stages)) - set(stages) if stages else set()
    return sorted(upstream, key=lambda s: s.addressing), stages


def stop_on_signals(signum, frame):
    """SIGTERM (kill, timeout, a batch scheduler's cancel) and SIGHUP (the terminal closed) end this
    process as Ctrl-C does, through the `finally` that stops the runs: by default Python dies at once
    and leaves them training, each in its own session, outside DVC's lock."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP that arrive inside the block are acted on when it ends, so that a
    run's record (`dvc commit` writing dvc.lock) is never cut off halfway. Python runs signal
    handlers in the main thread whichever thread the signal reached, so a handler that only notes
    the signal defers it in a process with other threads too (a blocking mask would not: a signal
    sent to the process goes to any thread that does not block it). Main thread only."""
    held: list[int] = []
    kinds = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in kinds}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])          # now, to the handler that was there before


def out_of_memory(log: Path) -> bool:
    """Whether a run's log ends in PyTorch's out-of-memory error (torch.OutOfMemoryError)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        return False
    return "CUDA out of memory" in tail or "OutOfMemoryError" in tail


def quiet_for(job: Job, now: float) -> float:
    """Seconds since the run last wrote to its log (a training writes a line every epoch), or since
    it started if it has written nothing since."""
    try:
        return now - max(job.started, job.log.stat().st_mtime)
    except OSError:
        return now - job.started


def stop_stalled(job: Job, stall_after: float, now: float) -> None:
    """Stop a run that has written nothing to its log for `stall_after` seconds (a hung process would
    hold its slot, and the final `dvc repro`, forever): SIGTERM to its process group, SIGKILL if it
    is still there 30 s later. It then counts as failed and resumes from its last epoch when run again."""
    with contextlib.suppress(ProcessLookupError):          # it may end between the poll and the signal
        if not job.stalled and quiet_for(job, now) > stall_after:
            job.stalled = now
            console.print(f"[red]stalled[/red] {job.stage}: nothing in its log for {stall_after:g} s; stopping it "
                          f"(it resumes from its last epoch when run again)  (log: {escape(str(job.log))})",
                          soft_wrap=True)
            os.killpg(job.process.pid, signal.SIGTERM)
        elif job.stalled and now - job.stalled > 30:
            os.killpg(job.process.pid, signal.SIGKILL)


def failed_alike(lines: list[str], slots: int) -> bool:
    """Whether the runs that failed since the last one that ended well share their cause: the last
    max(2, slots) of them failed with the same line. A line that names no run of its own (a card
    that cannot run the settings, a compiler that fails on every graph, a missing input) would stop
    every waiting run too, each after its start-up and perhaps minutes of compiling."""
    n = max(2, slots)
    return len(lines) >= n and len(set(lines[-n:])) == 1 and lines[-1] != ""


def run_jobs(jobs: list[Job], slots: int, on_done, status_every: float = 0, stall_after: float = 0) -> list[Job]:
    """Run the jobs `slots` at a time; `on_done(job, returncode)` as each ends. Returns the failed ones:
    those that exited non-zero, those whose `on_done` returned False (not recorded), and those stopped
    for writing nothing to their log in `stall_after` seconds (0: never; `stop_stalled`). When the
    runs fail alike (`failed_alike`), the waiting ones are not started and are returned too, with
    `attempts` 0: run again once the cause is fixed.

    A run that runs out of GPU memory while others run beside it is not failed: it goes back to the
    front of the queue and starts again (resuming from its last epoch) when one fewer runs, and from
    then on at most that many run at once. Alone, it fails as any other run does.
    Ended by Ctrl-C, SIGTERM or SIGHUP, it stops the runs still going and waits for them to exit.
    Every `status_every` seconds (0: never) it prints a status_line."""
    pending, running, failed = list(jobs), {}, []
    alike: list[str] = []           # the failure lines of the runs that failed since the last that ended well
    finished, next_status, limit = 0, time.time() + status_every, slots
    gpus = visible_gpus()
    cores = cpu_cores()
    policy = wait_policy(jobs, slots, cores)
    if policy:
        console.print(f"{threads_at_once(jobs, slots)} threads at once for {cores} cores: the runs' OpenMP "
                      f"threads wait passively (OMP_WAIT_POLICY=PASSIVE); "
                      "spinning, they made -j 2 seven times slower than -j 1 on 2 cores", soft_wrap=True)
    free = list(range(slots))
    previous = {s: signal.signal(s, stop_on_signals) for s in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(s) is not signal.SIG_IGN}        # under nohup, SIGHUP stays ignored
    try:
        while pending or running:
            while pending and free and len(running) < limit:
                job, slot = pending.pop(0), free.pop(0)
                env = {**os.environ, **policy}
                if gpus:
                    job.gpu = gpus[slot % len(gpus)]
                    env["CUDA_VISIBLE_DEVICES"] = job.gpu
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with open(job.log, "ab" if job.attempts else "wb") as log:      # a retry adds to its log
                    job.process = subprocess.Popen(job.cmd, shell=True, cwd=job.wdir, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT, start_new_session=True)
                job.started, running[slot] = time.time(), job
                job.attempts += 1
                console.print(("again " if job.attempts > 1 else "start ") + job.stage +
                              (f" on GPU {job.gpu}" if job.gpu else "") + f"  (log: {job.log})", soft_wrap=True)
            time.sleep(0.2)
            for slot, job in list(running.items()):
                rc = job.process.poll()
                if rc is None:
                    if stall_after:
                        stop_stalled(job, stall_after, time.time())
                    continue
                del running[slot]
                free.append(slot)
                free.sort()
                if job.stalled:               # stopped here: a failure, not a run to record
                    failed.append(job)
                    continue
                if rc != 0 and running and out_of_memory(job.log):
                    limit = len(running)
                    pending.insert(0, job)
                    console.print(f"[yellow]out of GPU memory[/yellow] {job.stage} with {len(running) + 1} runs at "
                                  f"once: it starts again (from its last epoch) when a run ends; at most {limit} at "
                                  f"once from now on", soft_wrap=True)
                    continue
                with signals_held():
                    recorded = on_done(job, rc)
                if rc != 0 or recorded is False:
                    failed.append(job)
                    alike = alike + [failure_line(job.log)] if rc != 0 else []
                    if pending and failed_alike(alike, slots):
                        console.print(f"[red]not starting[/red] the {len(pending)} waiting run(s): the last "
                                      f"{max(2, slots)} failed alike ({escape(alike[-1])}), so they would too; fix "
                                      "that and run the same command again", soft_wrap=True)
                        failed += pending
                        pending = []
                else:
                    finished += 1
                    alike = []
            if status_every and running and time.time() >= next_status:
                next_status = time.time() + status_every
                console.print(time.strftime("%H:%M ") + status_line(list(running.values()), finished, pending, slots, len(failed)),
                              soft_wrap=True)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        stopping = [job for job in running.values() if job.process.poll() is None]
        for job in stopping:                  # Ctrl-C, a signal or an error here: stop the children with us
            os.killpg(job.process.pid, signal.SIGTERM)
        for job in stopping:                  # and hold DVC's lock until they are gone
            try:
                job.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(job.process.pid, signal.SIGKILL)
                job.process.wait()
            console.print(f"stopped {job.stage}; it resumes from its last epoch when run again", soft_wrap=True)
    return failed


# a line that names what stopped a run: a Python exception ("torch.OutOfMemoryError: ...", "KeyError")
# or a stage's own one-line error (`io.run_cli`: "error: ...")
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)\b(?::.*)?|error: .*)$")


def failure_line(log: Path) -> str:
    """The line of a failed run's log that says why: the last one naming an error, else the last one.

    The last line alone is not enough: a compiler's error (inductor's C++ or Triton) prints pages of
    its output after the exception that names it."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    named = [x for x in lines if ERROR_LINE.match(x)]
    return (named or lines or [""])[-1]


def report_failure(job: Job, rc: int, took: float) -> None:
    """One line: which run failed, how, and why in its log's words (escaped: a log may hold [ ], which
    rich would read as markup, swallowing the text or raising on a stray closing tag)."""
    console.print(f"[red]failed[/red] {job.stage} (exit {rc}, {took:.0f} s): {escape(failure_line(job.log))}  "
                  f"(log: {escape(str(job.log))})", soft_wrap=True)


def record_run(repo, job: Job, rc: int) -> bool:
    """What `dvc repro` would write for a run that ended: `dvc commit` of its stage (deps, params and
    outputs hashed into dvc.lock, outputs cached). A failed run, or a record that fails (a full disk
    while caching, say), gets one line, stays unrecorded and returns False; the other runs go on, and
    the next `resnorm.parallel` or `dvc repro` records it (a finished training is not trained again)."""
    took = time.time() - job.started
    if rc != 0:
        report_failure(job, rc, took)
        return False
    try:
        repo.commit(job.stage, force=True)
    except Exception as e:                 # one run's record must not stop the runs beside it
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        console.print(f"[red]not recorded[/red] {job.stage}: `dvc commit` failed: {escape(why)}; its outputs "
                      "are kept, and `dvc repro` records them", soft_wrap=True)
        return False
    console.print(f"done  {job.stage} in {took:.0f} s, recorded in dvc.lock", soft_wrap=True)
    return True


def set_params(overrides: list[str], path: Path = Path("params.yaml")) -> None:
    """Apply `-S` overrides to params.yaml with DVC's parser, then validate the result; on a bad
    override or value, params.yaml is left as it was."""
    from dvc.utils.hydra import apply_overrides
    before = path.read_bytes()
    try:
        apply_overrides(path, overrides)
        load_params(path)
    except Exception as e:
        path.write_bytes(before)
        # DVC's InvalidArgumentError is a bare label ("Invalid `--set-param` value"); its cause says why
        why = [str(x).splitlines()[0] for x in (e, e.__cause__) if x is not None and str(x)]
        raise UserError(f"-S {' -S '.join(overrides)}: {': '.join(why) or type(e).__name__}") from None


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m resnorm.parallel", description=__doc__.split("\n")[0])
    ap.add_argument("patterns", nargs="*", help="training stages to consider (fnmatch, default: all)")
    ap.add_argument("-j", "--jobs", type=positive_int, default=2, help="runs at once (default 2)")
    ap.add_argument("--dry", action="store_true", help="print what would run and stop")
    ap.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                    help="edit params.yaml first, with the syntax of `dvc exp run -S`")
    ap.add_argument("--train-only", action="store_true", help="stop after the training stages (no `dvc repro`)")
    ap.add_argument("--status-every", type=float, default=60, metavar="SECONDS",
                    help="a line on the runs' epochs and the time left this often (default 60; 0: never)")
    ap.add_argument("--stall-after", type=float, default=0, metavar="SECONDS",
                    help="stop a run that writes nothing to its log this long (a training writes a line an "
                         "epoch); it counts as failed and resumes when run again (default 0: never)")
    args = ap.parse_args(argv)
    if not (args.stall_after == 0 or 0 < args.stall_after < float("inf")):
        raise UserError(f"--stall-after = {args.stall_after:g} is not allowed: seconds > 0, or 0 for never")
    if not (args.status_every == 0 or 0 < args.status_every < float("inf")):
        raise UserError(f"--status-every = {args.status_every:g} is not allowed: seconds > 0, or 0 for never")
    if not Path("dvc.yaml").exists():
        raise UserError("dvc.yaml not found: run from the repository root")

    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    if args.set_param:
        set_params(args.set_param)

    repo = Repo()
    start = time.time()
    try:
        with lock_repo(repo):
            upstream, stages = plan(repo, args.patterns)
            stale_upstream = [s for s in upstream if s.changed()]
            if stale_upstream and not args.dry:
                for s in stale_upstream:          # DVC runs them (and their own upstream) in order
                    console.print(f"dvc repro {s.addressing}")
                    repo.reproduce(s.addressing)
                upstream, stages = plan(repo, args.patterns)
            stale = [s for s in stages if s.changed()]
            params = load_params()
            jobs = [job_for(s, params) for s in stale]
            gpus = visible_gpus()
            console.print(f"{len(stages)} training stages, {len(stale)} to run, {args.jobs} at a time"
                          + (f" on GPU {', '.join(gpus)}" if gpus else " on the CPU")
                          + (f" (first: {', '.join(s.addressing for s in stale_upstream)})"
                             if stale_upstream and args.dry else ""), soft_wrap=True)
            if args.dry:
                for j in jobs:
                    console.print(f"  {j.stage}: {j.cmd}", soft_wrap=True, markup=False)
                return
            failed = run_jobs(jobs, args.jobs, lambda job, rc: record_run(repo, job, rc), args.status_every,
                              args.stall_after)
    except LockError as e:
        raise UserError(f"the DVC repository is locked ({e}); is another `dvc repro` running?") from None
    finally:
        repo.close()
    took = time.time() - start
    console.print(f"{len(jobs) - len(failed)} of {len(jobs)} runs trained in {took:.0f} s wall, {args.jobs} at a time")
    if failed:
        waiting = [j for j in failed if not j.attempts]
        raise UserError(f"{len(failed) - len(waiting)} run(s) failed: {', '.join(j.stage for j in failed if j.attempts)}"
                        + (f"; {len(waiting)} not started" if waiting else "") + f"; see their logs in {LOGS}/")
    if not args.train_only:
        r = subprocess.run([sys.executable, "-m", "dvc", "repro"])
        if r.returncode:
            sys.exit(r.returncode)


if __name__ == "__main__":
    run_cli(main, stage=False)
