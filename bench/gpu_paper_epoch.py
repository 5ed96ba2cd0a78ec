"""GPU check of the paper setting: 256x256, n=2, batch 32, 25 classes, generated data.

  python bench/gpu_paper_epoch.py [--images 6400] [--out DIR] [--no-compile]

For each study variant (ours: bn, gn, in, ln, bin, nn; PyTorch's BatchNorm2d and
GroupNorm beside them), trains on a slice of generated birds-sized data (uint8 images
on the GPU, flip augmentation and normalization on the GPU as in training) with bf16
autocast, channels_last, cudnn.benchmark and torch.compile (and eager with --eager),
and prints sustained images/s; results are written to gpu_results.json after each
variant, so a run cut short keeps what it measured. Then projects the wall time of the
whole paper study from each variant's own rate: the 7 variants x 50 epochs x 24,706
train images (gpu_speed.paper_epoch), plus BN and GN at batch 8 and 128 (50 epochs each, no early stop assumed),
training only. Also times the CPU data path (memory-mapped uint8 256x256, 4 and 8
workers) that would feed it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from resnorm.data import EpochBatches, Split, batches  # noqa: E402
from resnorm.model import ResNet  # noqa: E402
from resnorm.norms import NORMS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import PAPER_EPOCHS as EPOCHS, paper_epoch  # noqa: E402

TRAIN_IMAGES = paper_epoch()[0]     # the birds set's 30,000 less the test split prepare carves out of them


def variant_model(name: str) -> nn.Module:
    if name == "torch_gn":
        saved = NORMS["gn"]
        NORMS["gn"] = lambda c, num_groups=4, **kw: nn.GroupNorm(num_groups, c)
        try:
            return ResNet(2, 25, norm="gn")
        finally:
            NORMS["gn"] = saved
    return ResNet(2, 25, norm=name)


def make_step(name: str, data: torch.Tensor, labels: torch.Tensor, batch: int, compile_):
    """One SGD step of the paper setting on `data`'s device: a random batch of uint8 images,
    flipped and normalized there, bf16 autocast, channels_last. `compile_`: False (eager), True
    (inductor's default mode) or a mode name ("reduce-overhead" = CUDA graphs)."""
    torch._dynamo.reset()      # a fresh, static-shape compile per run, as in training (one batch size per process)
    torch.manual_seed(0)
    device = data.device
    model = variant_model(name).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    step_model = model if not compile_ else torch.compile(model, **({} if compile_ is True else {"mode": compile_}))
    mean = torch.tensor([0.5, 0.5, 0.5], device=device).view(1, 3, 1, 1)
    n = len(data)

    def step(i):
        idx = torch.randint(0, n, (batch,), device=device)
        x = data[idx].float().div_(255).sub_(mean).div_(0.25)
        flip = torch.rand(batch, device=device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(step_model(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def images_per_second(name: str, data: torch.Tensor, labels: torch.Tensor, batch: int, compile_,
                      seconds: float) -> tuple[float, float]:
    step = make_step(name, data, labels, batch, compile_)
    t0 = time.perf_counter()
    for i in range(10):            # warm-up, compile, cudnn autotune
        step(i)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            step(steps)
            steps += 1
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0), warm


def cpu_data_path(images: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        x = np.lib.format.open_memmap(Path(tmp) / "x.npy", mode="w+", dtype=np.uint8, shape=(images, 256, 256, 3))
        x[:] = np.random.default_rng(0).integers(0, 255, x.shape, dtype=np.uint8)
        x.flush()
        split = Split("train", np.load(Path(tmp) / "x.npy", mmap_mode="r"), np.zeros(images, np.int64))
        ds = EpochBatches(split, 32, [0.5] * 3, [0.25] * 3, shuffle=True, seed=0, epoch=0, augment=True,
                          padding=4, hflip=True)
        t0, n = time.perf_counter(), 0
        for batch in batches(ds, workers, pin_memory=True):
            x, y = ds.to(batch, "cuda", True)     # workers ship uint8 + crop/flip parameters; the GPU does the rest
            n += len(y)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=6400)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="bn,gn,torch_bn,in,ln,bin,nn,torch_gn", help="variants at batch 32")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False, help="also time eager mode")
    ap.add_argument("--extra", action=argparse.BooleanOptionalAction, default=True,
                    help="batch 8/128 runs, projection and the data path")
    ap.add_argument("--extra-norms", default="torch_bn,bn,gn", help="variants timed at the extra batch sizes")
    ap.add_argument("--extra-batches", default="8,128", help="the extra batch sizes (8 with CUDA graphs)")
    ap.add_argument("--data-path", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the CPU data path")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    data = torch.randint(0, 256, (args.images, 3, 256, 256), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 25, (args.images,), device="cuda")
    results = {"device": torch.cuda.get_device_name(), "rates": {}}
    modes = ([False] if args.eager else []) + ([] if args.no_compile else [True])
    for compile_ in modes:
        for name in [n for n in args.only.split(",") if n]:
            try:
                rate, warm = images_per_second(name, data, labels, 32, compile_, args.seconds)
            except Exception as e:          # report and carry on: one failure must not lose the rest
                print(f"{name} compile={compile_}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            key = f"{name}{'+compile' if compile_ else ''}"
            results["rates"][key] = round(rate, 1)
            print(f"{key:<18} {rate:8.0f} images/s at batch 32 (warm-up {warm:.1f}s)", flush=True)
            Path(args.out, "gpu_results.json").write_text(json.dumps(results, indent=2))
    if not args.extra:
        return
    for bs in (int(b) for b in args.extra_batches.split(",") if b):
        mode = "reduce-overhead" if bs <= 16 else True
        for name in [n for n in args.extra_norms.split(",") if n]:
            key = f"{name}-bs{bs}"
            for m in ((mode, False) if not args.no_compile else (False,)):
                try:
                    rate, _ = images_per_second(name, data, labels, bs, m, args.seconds / 2)
                    results["rates"][key] = round(rate, 1)
                    print(f"{key:<18} {rate:8.0f} images/s ({m or 'eager'})", flush=True)
                    break
                except Exception as e:
                    print(f"{key} {m}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            Path(args.out, "gpu_results.json").write_text(json.dumps(results, indent=2))
    r = results["rates"]
    study = ("nn", "torch_bn", "bn", "in", "bin", "ln", "gn")
    rate32 = {n: max(v for k, v in r.items() if k.split("+")[0] == n) for n in study
              if any(k.split("+")[0] == n for k in r)}
    if rate32:
        slowest = min(rate32.values())        # a variant not measured is assumed as slow as the slowest
        base = sum(EPOCHS * TRAIN_IMAGES / rate32.get(n, slowest) for n in study)
        extra = sum(EPOCHS * TRAIN_IMAGES / r.get(f"{n}-bs{b}", slowest) for n in ("bn", "gn") for b in (8, 128))
        results["projected_study_hours"] = round((base + extra) / 3600, 2)
        results["projection_assumed"] = [n for n in study if n not in rate32] + \
            [f"{n}-bs{b}" for n in ("bn", "gn") for b in (8, 128) if f"{n}-bs{b}" not in r]
        print(f"projected paper study (7 x 50 epochs at batch 32 + BN/GN at 8 and 128, {TRAIN_IMAGES:,} images, "
              f"training only): {(base + extra) / 3600:.2f} h; assumed at the slowest rate: "
              f"{results['projection_assumed'] or 'none'}", flush=True)
    for w in ((4, 8) if args.data_path else ()):
        rate = cpu_data_path(4096, w)
        results["rates"][f"cpu_data_path_{w}_workers"] = round(rate, 1)
        print(f"data path (memory-mapped 256px uint8, {w} workers, crop/flip/normalize on GPU): "
              f"{rate:.0f} images/s", flush=True)
    Path(args.out, "gpu_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
