"""The pipeline's own images/s on one GPU, beside the bench loop's, and with several runs at once.

  python bench/gpu_speed.py --phase single         # resnorm.train alone: bn, gn, torch_bn at batch 32
  python bench/gpu_speed.py --phase bench          # bench/gpu_paper_epoch.py on the same configurations
  python bench/gpu_speed.py --phase concurrent     # resnorm.parallel -j 4 and -j 8: aggregate images/s
  python bench/gpu_speed.py --phase single --configs bn:8:reduce-overhead,bn:128
  python bench/gpu_speed.py --phase concurrent --jobs 4 --concurrent-compile reduce-overhead   # under CUDA graphs
  python bench/gpu_speed.py --phase concurrent --jobs 4 --concurrent-config bn:8 --concurrent-compile reduce-overhead
  python bench/gpu_speed.py --phase project        # the paper study's hours from what speed.json holds
  python bench/gpu_speed.py --phase project --results call1/speed.json call2/speed.json --out merged/

Every figure here comes from the real pipeline: `python -m resnorm.train` (its epoch log,
logs/timing/<run>.csv:
train images over train seconds, epochs 2 on, so the epoch-1 compile is apart) and
`python -m resnorm.parallel` (which runs the DVC training stages and records them with
`dvc commit`); the bench loop only stands beside them. The work folder is a DVC copy of this
project whose `data/prepared` arrays are generated (256x256 uint8 noise, 25 classes) and
recorded with `dvc commit`, so no JPEG set is needed. Results accumulate in
$OUT/speed.json after each measurement, so a call cut short keeps what it measured.
`--phase project` reads them back and projects the paper study's training time: each run of
params.yaml's study (its variants' batch sizes x its seeds, plus the single experiment, stage `train`) at 50 epochs of the paper epoch
(paper_epoch: 24,706 train images, the test split carved out of the birds set's 30,000, and 7,500
val), at the fastest route measured for its batch size (one run at a time, or j at once). A projection, not
a measurement: it assumes no run stops early and every norm at the measured norms' slowest rate.
Settings: the README's paper setting (bf16, channels_last, compile, lr 1e-4, no augmentation).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from resnorm.prepare import describe_arrays  # noqa: E402  (this checkout's, as the copy's)

HERE = Path(__file__).resolve().parents[1]
CLASSES = 25
CLASS_NAMES = [f"class_{i:02d}" for i in range(CLASSES)]
GRADCAM_CLASSES = CLASS_NAMES[:7]


def sh(cmd: list[str], cwd: Path, log: Path | None = None, env: dict | None = None) -> float:
    """Run a command, its output to `log`; returns its wall seconds; raises with the log's tail."""
    t0 = time.time()
    with open(log or os.devnull, "wb") as f:
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{tail}")
    return time.time() - t0


# What a working copy of the pipeline needs from this checkout: the stages' code and every
# dependency that no stage makes (the rest, data/ models/ metrics/ plots/, the pipeline makes)
PIPELINE_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore", "src", "weights", ".dvc/plots")


def copy_pipeline(dest: Path, keep_params: bool = False) -> None:
    """This checkout's pipeline files into `dest`, replacing what is there (params.yaml too,
    unless `keep_params`). bench/gpu_e2e.sh uses it as well: one list, so no copy misses a new dependency."""
    for name in PIPELINE_FILES:
        if keep_params and name == "params.yaml":
            continue
        source, target = HERE / name, dest / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)


def setup(work: Path, args) -> Path:
    """A git + DVC copy of the project with generated prepared arrays, recorded as DVC outputs."""
    repo = work / "repo"
    if (repo / "dvc.lock").exists():          # the generated arrays are kept; the code is this checkout's
        copy_pipeline(repo, keep_params=True)
        edit_params(repo, gradcam__classes=GRADCAM_CLASSES)      # a copy made before this line existed
        describe_stand_in(repo / "data" / "prepared")            # and before prepare wrote this file
        record_stand_in_data(repo, work)      # new fetch or prepare code must not replace the generated arrays
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    git = shutil.which("git") is not None           # a bare GPU image may have no git: DVC works without
    if git:
        sh(["git", "init", "-q"], repo)
    sh([sys.executable, "-m", "dvc", "init", "-q"] + ([] if git else ["--no-scm"]), repo, work / "init.log")
    copy_pipeline(repo)
    rng = np.random.default_rng(0)
    prepared = repo / "data" / "prepared"
    prepared.mkdir(parents=True)
    for split, n in (("train", args.images), ("val", args.val), ("test", 64)):
        x = np.lib.format.open_memmap(prepared / f"{split}_x.npy", "w+", np.uint8, (n, args.size, args.size, 3))
        for i in range(0, n, 1024):
            x[i:i + 1024] = rng.integers(0, 256, x[i:i + 1024].shape, dtype=np.uint8)
        x.flush()
        np.save(prepared / f"{split}_y.npy", rng.integers(0, CLASSES, n).astype(np.int64))
    (prepared / "classes.json").write_text(json.dumps(CLASS_NAMES))
    describe_stand_in(prepared)
    (prepared / "manifest.csv").write_text("path,sha1,class,split\n")
    raw = repo / "data" / "raw" / "ifct"
    raw.mkdir(parents=True)
    (raw / "README.txt").write_text("stand-in: the arrays in data/prepared were generated\n")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"].update(image_size=args.size, root="data/raw/ifct")
    p["model"]["n"] = 2
    p["train"].update(lr=1e-4, nesterov=False, weight_decay=0.0, warmup_epochs=0, augment=False,
                      device=args.device, precision=default_precision(args.device),
                      channels_last=True, compile=args.device == "cuda",
                      workers=4 if args.device == "cuda" else 0, threads=2 if args.device == "cuda" else 1,
                      epochs=args.epochs, schedule="cosine")
    p["study"] = {"seeds": [0], "variants": {}}
    p["gradcam"]["classes"] = GRADCAM_CLASSES     # a study run checks them against the data before training
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    record_stand_in_data(repo, work)
    return repo


def describe_stand_in(prepared: Path) -> None:
    """arrays.json, as `prepare` writes it beside the arrays (digests, the train split's mean and std)."""
    (prepared / "arrays.json").write_text(json.dumps(describe_arrays(prepared)))


def record_stand_in_data(repo: Path, work: Path) -> None:
    """Record the generated arrays as what `fetch` and `prepare` made, with this code: else
    `resnorm.parallel`, which brings `prepare` up to date first, would fetch and prepare the real data
    set over them (in a copy kept from before a change to either stage's code)."""
    sh([sys.executable, "-m", "dvc", "commit", "-f", "fetch", "prepare"], repo, work / "commit.log")


def edit_params(repo: Path, **top) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in top.items():
        section, _, name = key.partition("__")
        if name:
            p[section][name] = value
        else:
            p[section] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def history_rates(path: Path) -> tuple[list[float], float]:
    """(train images/s of epochs 2 on, seconds of epoch 1: compile + cudnn autotuning + one epoch)."""
    rows = list(csv.DictReader(open(path)))
    return [float(r["images_per_second"]) for r in rows[1:]], float(rows[0]["epoch_seconds"])


def epoch_over_train_time(path: Path, images: int) -> float:
    """A whole epoch's seconds (validation and checkpoint included) over its training seconds, epochs 2 on."""
    rows = list(csv.DictReader(open(path)))[1:]
    return (sum(float(r["epoch_seconds"]) for r in rows) /
            sum(images / float(r["images_per_second"]) for r in rows))


def peak_gib(path: Path) -> float | None:
    """The most GPU memory the run's allocator held (GiB, `gpu_peak_gib` of its timing log); None on a
    CPU or from a log written before the column existed."""
    peaks = [float(r["gpu_peak_gib"]) for r in csv.DictReader(open(path)) if r.get("gpu_peak_gib")]
    return max(peaks) if peaks else None


def save(out: Path, results: dict) -> None:
    (out / "speed.json").write_text(json.dumps(results, indent=2))


def default_precision(device: str) -> str:
    """The README's paper setting: bf16 autocast on CUDA; a CPU trains in fp32."""
    return "bf16" if device == "cuda" else "fp32"


def precision_of(args) -> str:
    """train.precision of every run this call makes. Each phase sets it, and --epochs, in the work
    copy's params.yaml before it trains: that file persists from call to call and phase to phase."""
    return args.precision or default_precision(args.device)


def phase_single(repo: Path, out: Path, args, results: dict, deadline: float) -> None:
    for cfg in args.configs.split(","):
        if time.time() > deadline:
            print(f"skipped {cfg}: past the time budget", flush=True)
            continue
        norm, bs, *mode = cfg.split(":")
        compile_ = mode[0] if mode else (args.device == "cuda")
        precision = precision_of(args)
        # what differs from the paper setting, after a "|": "bn:32|fp32", "bn:32|cudnn-limit-0"
        tags = ([precision] if precision != default_precision(args.device) else []) + \
            ([f"cudnn-limit-{args.cudnn_benchmark_limit}"] if args.cudnn_benchmark_limit is not None else [])
        key = cfg + ("|" + ",".join(tags) if tags else "")
        edit_params(repo, norm=norm, batch_size=int(bs), train__compile=compile_, train__precision=precision,
                    train__epochs=args.epochs)
        shutil.rmtree(repo / "models" / "experiment", ignore_errors=True)
        train = [sys.executable, "-m", "resnorm.train"]
        if args.cudnn_benchmark_limit is not None:     # the same train loop, with PyTorch's flag set first
            train = [sys.executable, "-c", f"import runpy, torch; torch.backends.cudnn.benchmark_limit = "
                     f"{args.cudnn_benchmark_limit}; runpy.run_module('resnorm.train', run_name='__main__')"]
        try:
            wall = sh(train, repo, out / f"train_{key.replace(':', '_').replace('|', '_')}.log")
        except RuntimeError as e:
            print(f"{key}: {e}", flush=True)
            continue
        history = repo / "logs" / "timing" / "experiment.csv"
        rates, first = history_rates(history)
        peak = peak_gib(history)
        results["single"][key] = {"precision": precision, "cudnn_benchmark_limit": args.cudnn_benchmark_limit,
                                  "images_per_second": [round(r) for r in rates],
                                  "median": round(statistics.median(rates)), "epoch1_seconds": round(first, 1),
                                  **split_sizes(repo),
                                  "epoch_over_train_time": round(epoch_over_train_time(history, args.images), 3),
                                  "process_seconds": round(wall, 1), "gpu_peak_gib": peak}
        save(out, results)
        print(f"resnorm.train {key:<24} {statistics.median(rates):7.0f} images/s (epochs 2-{len(rates) + 1}: "
              f"{', '.join(f'{r:.0f}' for r in rates)}); epoch 1 {first:.1f} s; process {wall:.0f} s"
              + (f"; GPU memory held at most {peak:.2f} GiB" if peak is not None else ""), flush=True)


def phase_bench(repo: Path, out: Path, args, results: dict, deadline: float) -> None:
    norms = sorted({c.split(":")[0] for c in args.configs.split(",") if c.split(":")[1] == "32"})
    extra = [c.split(":") for c in args.configs.split(",") if c.split(":")[1] != "32"]
    cmd = [sys.executable, str(HERE / "bench" / "gpu_paper_epoch.py"), "--images", str(args.images),
           "--seconds", str(args.bench_seconds), "--only", ",".join(norms), "--out", str(out),
           "--extra-norms", ",".join(sorted({e[0] for e in extra})) or "bn",
           "--extra-batches", ",".join(sorted({e[1] for e in extra})), "--no-data-path"]
    if not extra:
        cmd.append("--no-extra")
    try:
        sh(cmd, repo, out / "bench.log")
    except RuntimeError as e:
        print(e, flush=True)
    print((out / "bench.log").read_text(), flush=True)
    gr = out / "gpu_results.json"
    if gr.exists():
        results["bench"] = json.loads(gr.read_text())
        save(out, results)


PAPER_EPOCHS = 50
BIRDS_TRAIN_FOLDER, BIRDS_VALID = 30_000, 7_500      # the birds set as distributed: train/ and valid/, no test/
MEASURED_VAL_IMAGES = 512                           # --val's default, for records that did not keep theirs


def split_sizes(repo: Path) -> dict[str, int]:
    """The work copy's train and val images, as its prepared arrays hold them (a kept copy may have
    been made with other --images / --val than this call's)."""
    prepared = repo / "data" / "prepared"
    return {f"{split}_images": int(np.load(prepared / f"{split}_y.npy", mmap_mode="r").shape[0])
            for split in ("train", "val")}


def paper_epoch(params: Path = HERE / "params.yaml") -> tuple[int, int]:
    """(train, val) images of one epoch of the paper study. `prepare` keeps the birds set's valid/ as
    val and, as there is no test/ folder, carves test out of train/: data.split.test / (train + test)
    of each class (group-aware, so to within a few images)."""
    split = yaml.safe_load(params.read_text())["data"]["split"]
    return round(BIRDS_TRAIN_FOLDER * split["train"] / (split["train"] + split["test"])), BIRDS_VALID


def paper_overhead(route: dict, paper: tuple[int, int]) -> float:
    """A route's epoch / train-time ratio at the paper study's val / train ratio: the measured part
    above 1 (validation, and the checkpoint, counted with it: an overestimate) scales with val images
    per train image. Routes measured before they kept their ratio are taken as they are."""
    ratio = route.get("val_ratio")
    return route["overhead"] if ratio is None else 1 + (route["overhead"] - 1) * (paper[1] / paper[0]) / ratio


def study_runs(params: Path = HERE / "params.yaml", skip: tuple[str, ...] = ()) -> dict[int, int]:
    """The paper pipeline's trainings per batch size: params.yaml's study variants (less `skip`) x its
    seeds, plus the single experiment (stage `train`, the top-level norm and batch size): `dvc repro`
    and `resnorm.parallel` train it too, so it counts, though the study trains the same model."""
    p = yaml.safe_load(params.read_text())
    unknown = set(skip) - set(p["study"]["variants"])
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} not in {params}'s study")
    runs: dict[int, int] = {int(p["batch_size"]): 1}
    for name, variant in p["study"]["variants"].items():
        if name in skip:
            continue
        batch = int(variant.get("batch_size", p["batch_size"]))
        runs[batch] = runs.get(batch, 0) + len(p["study"]["seeds"])
    return runs


def study_hours(runs: dict[int, int], routes: dict[int, dict], paper: tuple[int, int] | None = None) -> float:
    """Training hours of the study: for each batch size, its runs x 50 epochs x the paper epoch's
    train images (`paper`: (train, val), default paper_epoch()) at the route's aggregate images/s
    (`rate`), times its epoch / train-time ratio at the paper's val / train ratio (paper_overhead:
    validation, checkpoints), plus its epoch-1 extra (`extra` seconds: start-up, compile) once per
    wave of `jobs` runs at once."""
    paper = paper or paper_epoch()
    seconds = 0.0
    for batch, n in runs.items():
        r = routes[batch]
        train = n * PAPER_EPOCHS * paper[0] / r["rate"] * paper_overhead(r, paper)
        seconds += train + math.ceil(n / r["jobs"]) * r["extra"]
    return seconds / 3600


def val_ratio(record: dict, images: int) -> float:
    """Val over train images where a speed.json record was measured (older records: --val's default
    over `images`)."""
    return record.get("val_images", MEASURED_VAL_IMAGES) / record.get("train_images", images)


def best_routes(results: dict, images: int) -> dict[int, dict]:
    """The fastest measured route per batch size in speed.json: one `resnorm.train` at a time (at the
    slowest of the norms measured at that batch and mode), or j runs at once (`together`)."""
    routes: dict[int, dict] = {}
    measured = [r["epoch_over_train_time"] for section in ("single", "concurrent")
                for r in results.get(section, {}).values() if "epoch_over_train_time" in r]
    fallback = max(measured, default=1.0)      # for single runs recorded before they kept their own
    singles: dict[tuple[int, str], list[dict]] = {}
    for key, r in results.get("single", {}).items():
        cfg, _, tags = key.partition("|")          # "bn:32:max-autotune|fp32": what differs from the paper setting
        _, bs, *mode = cfg.split(":")
        singles.setdefault((int(bs), (mode[0] if mode else "compile") + (f", {tags}" if tags else "")), []).append(r)
    candidates = []
    for (batch, mode), rs in singles.items():
        slow = min(rs, key=lambda r: r["median"])
        steady_epoch = slow.get("train_images", images) / slow["median"]
        candidates.append((batch, {"route": f"one at a time ({mode}, {len(rs)} norm(s))", "jobs": 1,
                                   "rate": slow["median"], "overhead": slow.get("epoch_over_train_time", fallback),
                                   "extra": max(0.0, slow["epoch1_seconds"] - steady_epoch),
                                   "val_ratio": val_ratio(slow, images)}))
    for key, c in results.get("concurrent", {}).items():
        candidates.append((c.get("batch", 32), {"route": f"{c['runs']} at once (compile: {c['compile']}"
                                                         f"{', MPS' if c.get('mps') else ''})",
                                                "jobs": c["runs"], "rate": c["together"],
                                                "overhead": c["epoch_over_train_time"],
                                                "extra": c["epoch1_extra_seconds"], "val_ratio": val_ratio(c, images)}))
    for batch, route in candidates:
        if batch not in routes or route["rate"] > routes[batch]["rate"]:
            routes[batch] = route
    return routes


def phase_project(out: Path, args, results: dict) -> None:
    skip = args.skip_variants
    runs, routes = study_runs(skip=skip), best_routes(results, args.images)
    missing = sorted(set(runs) - set(routes))
    if missing:
        print(f"no projection: nothing measured at batch {', '.join(map(str, missing))}", flush=True)
        return
    paper = paper_epoch()
    hours = study_hours(runs, routes, paper)
    for batch in sorted(runs):
        r = routes[batch]
        print(f"batch {batch:>3}: {runs[batch]:2d} runs at {r['rate']:,.0f} images/s ({r['route']}), "
              f"epoch / train time {r['overhead']:.3f} as measured (val / train {r['val_ratio']:.3f}), "
              f"{paper_overhead(r, paper):.3f} at the paper's, epoch-1 extra {r['extra']:.0f} s per wave", flush=True)
    without = f" without {', '.join(skip)}" if skip else ""
    print(f"projected paper study{without}: {sum(runs.values())} runs (the study's and the experiment's) x {PAPER_EPOCHS} epochs x "
          f"{paper[0]:,} train images (the birds set's {BIRDS_TRAIN_FOLDER:,} less the test split prepare carves "
          f"out of them) and {paper[1]:,} val, no early stop: {hours:.2f} h of training (a projection from the "
          f"figures above)", flush=True)
    results["projection"] = {"hours": round(hours, 2), "skipped_variants": list(skip),
                             "paper_epoch": {"train": paper[0], "val": paper[1]},
                             "runs": {str(b): n for b, n in sorted(runs.items())},
                             "routes": {str(b): routes[b] for b in sorted(runs)}}
    save(out, results)


def fresh_seeds(repo: Path, variant: str, j: int) -> list[int]:
    """j seeds whose study stages `repo` has never run (none in dvc.lock), so that every measurement
    trains: a stage that is up to date would not run, and its old timing log would be read again."""
    lock = repo / "dvc.lock"
    done = set(yaml.safe_load(lock.read_text()).get("stages", {})) if lock.exists() else set()
    base = 100
    while any(f"study-train@{variant}-{s}" in done for s in range(base, base + j)):
        base += 100
    return list(range(base, base + j))


def phase_concurrent(repo: Path, out: Path, args, results: dict, deadline: float) -> None:
    mode = {"true": True, "false": False}.get(args.concurrent_compile, args.concurrent_compile)
    mode = args.device == "cuda" if mode is None else mode          # train.compile of every run
    norm, batch = args.concurrent_config.split(":")
    variant = f"{norm}-bs{batch}"
    for j in (int(x) for x in args.jobs.split(",")):
        if time.time() > deadline:
            print(f"skipped -j {j}: past the time budget", flush=True)
            continue
        seeds = fresh_seeds(repo, variant, j)
        edit_params(repo, study={"seeds": seeds, "variants": {variant: {"norm": norm, "batch_size": int(batch)}}},
                    train__compile=mode, train__precision=precision_of(args), train__epochs=args.epochs)
        try:
            wall = sh([sys.executable, "-m", "resnorm.parallel", "-j", str(j), "--train-only", "study-train@*"],
                      repo, out / f"parallel_j{j}.log")
        except RuntimeError as e:
            print(f"-j {j}: {e}", flush=True)
            continue
        per_run, overheads, firsts, peaks = [], [], [], []
        for s in seeds:
            history = repo / "logs" / "timing" / f"{variant}-{s}.csv"
            rates, first = history_rates(history)
            peaks.append(peak_gib(history))
            per_run.append(statistics.median(rates))
            firsts.append(first)
            overheads.append(epoch_over_train_time(history, args.images))
        images = j * args.epochs * args.images
        # all j together: j times the median run's rate. The sum of the runs' own medians overstates
        # it, as a run whose steady epochs fall while others still compile runs nearly alone.
        together = j * statistics.median(per_run)
        overhead = statistics.mean(overheads)
        extra = max(firsts) - args.images / min(per_run)
        # the whole paper study if every run, at any batch size, went at this rate (--phase project mixes routes)
        runs = sum(study_runs(skip=args.skip_variants).values())
        sizes = split_sizes(repo)
        hours = study_hours({0: runs}, {0: {"rate": together, "overhead": overhead, "extra": extra, "jobs": j,
                                            "val_ratio": sizes["val_images"] / sizes["train_images"]}})
        mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))    # under bench/gpu_check.sh's with_mps
        key = ":".join([str(j)] + ([args.concurrent_config] if args.concurrent_config != "bn:32" else []) +
                       ([str(mode)] if args.concurrent_compile is not None else []) + (["mps"] if mps else []))
        results["concurrent"][key] = {"runs": j, "norm": norm, "batch": int(batch), "compile": mode, "mps": mps,
                                      "wall_seconds": round(wall, 1),
                                      "sum_of_steady_rates": round(sum(per_run)),
                                      "together": round(together),
                                      "per_run_median": [round(r) for r in per_run],
                                      "train_images_over_wall": round(images / wall),
                                      "epoch_over_train_time": round(overhead, 3),
                                      "epoch1_extra_seconds": round(extra, 1),
                                      "projected_paper_study_hours": round(hours, 2), **sizes,
                                      # each run's own peak; their sum bounds what j at once held
                                      "gpu_peak_gib_per_run": peaks,
                                      "gpu_peak_gib_sum": round(sum(peaks), 2) if None not in peaks else None}
        save(out, results)
        print(f"resnorm.parallel -j {j} ({variant}, train.compile: {mode}{', under MPS' if mps else ''}): "
              f"{j} runs x {args.epochs} epochs in {wall:.0f} s wall; steady state {together:.0f} images/s together "
              f"({j} x the median run; {min(per_run):.0f}-{max(per_run):.0f} each); {images / wall:.0f} train "
              f"images/s over the whole wall time (start-up and compile included); validation adds "
              f"{overhead - 1:.0%} to an epoch; the paper study ({runs} runs x {PAPER_EPOCHS} epochs x "
              f"{paper_epoch()[0]:,} images, all at this rate) would take {hours:.2f} h"
              + (f"; GPU memory held at most {min(peaks):.2f}-{max(peaks):.2f} GiB a run, {sum(peaks):.1f} GiB "
                 f"for the {j}" if None not in peaks else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", action="append", choices=("single", "bench", "concurrent", "project"))
    ap.add_argument("--copy-pipeline", metavar="DEST", help="only copy this checkout's pipeline files into DEST")
    ap.add_argument("--configs", default="bn:32,gn:32,torch_bn:32", help="norm:batch[:compile mode],...")
    ap.add_argument("--jobs", default="4,8", help="concurrent runs to measure")
    ap.add_argument("--concurrent-config", default="bn:32", help="norm:batch of the concurrent runs")
    ap.add_argument("--concurrent-compile", help="train.compile of the concurrent runs (default: inductor's "
                    "default mode on CUDA, none on a CPU), e.g. reduce-overhead for CUDA graphs")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--bench-seconds", type=float, default=6.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cudnn-benchmark-limit", type=int, metavar="N",
                    help="single runs: torch.backends.cudnn.benchmark_limit (PyTorch's default 10 algorithms "
                         "tried per convolution; 0 tries every one)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                    help="train.precision of the runs (default: bf16 on CUDA, the paper setting; fp32 on a CPU)")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later measurements are skipped past it")
    ap.add_argument("--results", nargs="*", default=[], metavar="SPEED_JSON",
                    help="other calls' speed.json files whose figures the projection may use (merged into --out's)")
    ap.add_argument("--skip-variants", default="", metavar="A,B",
                    help="study variants the projection leaves out, e.g. bn-bs32-es,gn-bs32-es (the assignment's 11)")
    ap.add_argument("--work", default="/tmp/resnorm-speed")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/resnorm-speed/out")
    args = ap.parse_args()
    if args.copy_pipeline:
        copy_pipeline(Path(args.copy_pipeline))
        return
    if not args.phase:
        ap.error("--phase is required (single, bench, concurrent or project), or --copy-pipeline DEST")
    if args.epochs < 2 and {"single", "concurrent"} & set(args.phase):
        ap.error(f"--epochs {args.epochs}: at least 2 (rates are read from epoch 2 on; epoch 1 compiles)")
    args.skip_variants = tuple(v for v in args.skip_variants.split(",") if v)
    try:
        study_runs(skip=args.skip_variants)
    except ValueError as e:
        ap.error(f"--skip-variants: {e}")
    norm, _, batch = args.concurrent_config.partition(":")
    if not batch.isdigit() or int(batch) < 1:
        ap.error(f"--concurrent-config: expected norm:batch, e.g. bn:8, not {args.concurrent_config!r}")
    deadline = time.time() + args.budget
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = str(work / "repo" / "src")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    results = json.loads((out / "speed.json").read_text()) if (out / "speed.json").exists() else {}
    results.setdefault("single", {})
    results.setdefault("concurrent", {})
    for path in args.results:                      # other calls' figures, for the projection
        try:
            other = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--results: {path}: {e}")
        for section, entries in other.items():
            if section in ("single", "concurrent"):
                results[section].update(entries)
    if args.phase == ["project"]:                  # from speed.json alone: no working copy needed
        phase_project(out, args, results)
        return
    t0 = time.time()
    repo = setup(work, args)
    print(f"work copy ready in {time.time() - t0:.0f} s: {args.images} train / {args.val} val images at "
          f"{args.size} px, {args.epochs} epochs per run", flush=True)
    for phase in args.phase:
        if phase == "project":
            phase_project(out, args, results)
        else:
            {"single": phase_single, "bench": phase_bench, "concurrent": phase_concurrent}[phase](
                repo, out, args, results, deadline)


if __name__ == "__main__":
    main()
