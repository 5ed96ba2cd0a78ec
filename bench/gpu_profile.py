"""Where a training step's device time goes, by kind of kernel: the question behind goal 2 of issue 11.

  python bench/gpu_profile.py                                  # bn, gn, torch_bn; batch 32, 256 px, compiled
  python bench/gpu_profile.py --norms bn --batch 8 --compile reduce-overhead
  python bench/gpu_profile.py --device cpu --size 32 --images 64 --compile none   # the same on a CPU

One run of the pipeline makes 4,171 images/s on an H100, and 4 at once about 4,850 together.
Separate processes only time-slice a GPU (without MPS their kernels never run at the same time),
so that does not show one run fills it; but the study's 2-hour goal needs either runs whose
kernels share the GPU (bench/gpu_check.sh's MPS probes) or a cheaper step. Whether a cheaper
step can exist depends on what the step spends its time on: the convolutions (cuDNN at 16-64
channels), the norms and element-wise work (inductor's fused Triton kernels), copies, or the
GPU waiting for the host. For each norm this takes the step of `bench/gpu_paper_epoch.py` (the
paper setting: bf16, channels_last, uint8 images flipped and normalized on the device),
warms it up (compile, cuDNN autotuning), then records `--steps` steps with torch.profiler
and prints:

- the step's wall time, the device's busy time (the sum of its kernels: one stream, so
  they do not overlap) and the idle share between them;
- busy time by kind of kernel, and the largest kernels;
- the same in $OUT/profile.json (or --out);
- a memory-traffic ceiling: the bytes of every convolution's output per image (bf16), times
  `--passes` trips through device memory per step (default 10: forward, the conv writes its
  output and the norm reads it twice, for statistics and to apply, and writes it once, with the
  ReLU fused; backward, about six more), over `--bandwidth` GB/s. It is an estimate from the
  model's shapes and the card's data sheet, not a measurement: a loop that makes those trips
  cannot beat it, and how far the measured rate is below it says how much better kernels
  could gain (fewer trips, through more fusion, would raise it);
- the compute the step needs: the model's multiply-accumulates per image (`resnorm.summary`),
  times 3 for forward and backward, times 2 FLOPs each, so that a rate can be read as a share
  of the card's peak (`--peak-tflops`, default from the card's name: bf16 dense, H100 SXM 989,
  H200 989).

Under CUDA graphs (`--compile reduce-overhead`) whether the profiler sees each kernel of a replayed
graph depends on the CUDA and PyTorch versions: if the kinds come out nearly empty, so are the
busy time and the idle share, and only the step time counts. A diagnostic, not a speed claim: the rates that count come from `resnorm.train`
(bench/gpu_speed.py). On a CPU, "kernels" are the ATen operators' own (self) times.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_paper_epoch import make_step, variant_model  # noqa: E402  (it puts src/ on the path)
from resnorm.summary import summarize  # noqa: E402

# First match wins. GPU kernel names: inductor's Triton kernels first (triton_poi_ pointwise,
# triton_red_ / triton_per_ reductions: a fused name such as ..._convolution_backward_... is still
# a Triton reduction, not a convolution), cuDNN's batch norm (torch_bn), cuDNN / CUTLASS
# convolutions (fprop, dgrad, wgrad, implicit GEMM, winograd), cuBLAS for the linear layer, the
# optimizer's multi-tensor kernels, copies and fills; on a CPU the ATen operator names. A
# convolution's three passes are told apart where the kernel names them: the weight gradient
# reduces over every pixel of the batch into 16-64 x 16-64 x 3 x 3 values, the kind of kernel
# that can run far below the device's rates.
KINDS = [
    ("fused reduction (norm statistics, sums)", re.compile(r"^triton_(red|per)_")),
    ("fused element-wise (norm apply, ReLU, add)", re.compile(r"^triton_poi_")),
    ("batch norm (cuDNN / ATen)", re.compile(r"bn_fw|bn_bw|batch_?norm", re.I)),
    ("convolution: weight gradient (wgrad)", re.compile(r"wgrad|bwd_?filter", re.I)),
    ("convolution: input gradient (dgrad)", re.compile(r"dgrad|bwd_?data", re.I)),
    ("convolution: forward (fprop)", re.compile(r"fprop|implicit_convolve|fwd", re.I)),
    ("convolution (pass not named; layout changes)", re.compile(
        r"conv|implicit_gemm|winograd|nchwToNhwc|nhwcToNchw|mkldnn|onednn|cudnn", re.I)),
    ("matrix multiply (the linear layer)", re.compile(r"gemm|gemv|addmm|::mm\b|matmul|linear", re.I)),
    ("optimizer (SGD)", re.compile(r"multi_tensor|foreach|sgd", re.I)),
    ("copy / fill", re.compile(r"memcpy|memset|copy|fill|zero", re.I)),
    ("reduction (other)", re.compile(r"reduce|sum|mean|var|norm", re.I)),
    ("element-wise (other)", re.compile(r"elementwise|vectorized|relu|add|mul", re.I)),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def kernel_times(prof, device: str) -> dict[str, float]:
    """Kernel (GPU) or operator self (CPU) time per name, in microseconds over the recorded steps."""
    times: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if device == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            t = e.self_cuda_time_total if t is None else t
        else:
            if not e.key.startswith("aten::"):
                continue
            t = e.self_cpu_time_total
        if t > 0:
            times[e.key] += t
    return times


def profile_norm(name: str, data: torch.Tensor, labels: torch.Tensor, batch: int, compile_, steps: int) -> dict:
    device = data.device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step = make_step(name, data, labels, batch, compile_)
    for i in range(10):                       # compile, cuDNN autotuning, allocator warm-up
        step(i)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        wall = (time.perf_counter() - t0) * 1e6
    times = kernel_times(prof, device)
    busy = sum(times.values())
    by_kind: dict[str, float] = defaultdict(float)
    for k, t in times.items():
        by_kind[kind_of(k)] += t
    top = sorted(times.items(), key=lambda kv: -kv[1])[:12]
    return {"norm": name, "batch": batch, "compile": compile_, "steps": steps,
            "step_ms": round(wall / steps / 1e3, 3), "busy_ms": round(busy / steps / 1e3, 3),
            "idle_share": round(max(0.0, 1 - busy / wall), 3),
            "images_per_second_profiled": round(steps * batch / (wall / 1e6)),
            "by_kind_ms": {k: round(v / steps / 1e3, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(k[:120], round(v / steps / 1e3, 3)) for k, v in top]}


def show(r: dict) -> None:
    print(f"\n{r['norm']} batch {r['batch']} compile={r['compile']}: step {r['step_ms']:.2f} ms "
          f"({r['images_per_second_profiled']} images/s under the profiler), device busy {r['busy_ms']:.2f} ms, "
          f"idle {r['idle_share']:.0%}", flush=True)
    for kind, ms in r["by_kind_ms"].items():
        print(f"  {ms:8.3f} ms  {ms / r['busy_ms']:5.1%}  {kind}")
    print("  largest:")
    for k, ms in r["top_kernels_ms"]:
        print(f"  {ms:8.3f} ms  {k[:100]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--norms", default="bn,gn,torch_bn")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=2048, help="generated uint8 images held on the device")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", default="default", help="none, default, reduce-overhead or max-autotune")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passes", type=float, default=10.0, help="trips through memory per conv output per step")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 TFLOP/s of the card (default from its name)")
    ap.add_argument("--bandwidth", type=float, help="GB/s of device memory (default: from the card's name: "
                    "H100 SXM 3,350, H200 4,800)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    compile_ = {"none": False, "default": True}.get(args.compile, args.compile)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    data, labels = data.to(args.device), torch.randint(0, 25, (args.images,), generator=g).to(args.device)
    model = summarize(variant_model("bn"), args.size)     # per layer: output shape and multiply-accumulates
    per_image = 2 * sum(math.prod(r["output"]) for r in model["rows"] if r["type"] == "Conv2d")   # bf16 bytes
    card = torch.cuda.get_device_name() if args.device == "cuda" else ""
    bandwidth = args.bandwidth or (4800.0 if "H200" in card else 3350.0 if "H100" in card else None)
    ceiling = {"conv_output_mib_per_image": round(per_image / 2**20, 2), "passes": args.passes,
               "bandwidth_gb_s": bandwidth}
    line = (f"memory-traffic ceiling: the convolutions' outputs are {per_image / 2**20:.1f} MiB per {args.size} px "
            f"image in bf16; at {args.passes:g} trips each per step that is {per_image * args.passes / 1e6:.0f} MB")
    if bandwidth:
        ceiling["images_per_second_ceiling"] = round(bandwidth * 1e9 / (per_image * args.passes))
        line += f", which at {bandwidth:,.0f} GB/s caps the rate at {ceiling['images_per_second_ceiling']:,} images/s"
    print(line + " (an estimate from shapes, not a measurement)", flush=True)
    flops = 3 * 2 * model["macs"]
    peak = args.peak_tflops or (989.0 if ("H100" in card or "H200" in card) else None)
    ceiling["train_gflop_per_image"] = round(flops / 1e9, 2)
    line = f"compute: {flops / 1e9:.1f} GFLOP per image per training step (3 x 2 x the forward's multiply-accumulates)"
    if peak:
        ceiling["peak_tflops"] = peak
        ceiling["images_per_second_at_peak"] = round(peak * 1e12 / flops)
        line += f"; at {peak:g} TFLOP/s that is {ceiling['images_per_second_at_peak']:,} images/s"
    print(line, flush=True)
    results = [{"ceiling": ceiling}]
    for name in [n for n in args.norms.split(",") if n]:
        try:
            results.append(profile_norm(name, data, labels, args.batch, compile_, args.steps))
        except Exception as e:             # report and carry on: one failure must not lose the rest
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        show(results[-1])
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "profile.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
