"""The GPU session's scripts, rehearsed on the CPU: a device is lent for 15 minutes now and then,
and a script that broke since the last one (a new dependency, a new check) would waste it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_speed  # noqa: E402


def test_the_pipeline_copy_holds_every_input_no_stage_makes(tmp_path):
    """bench/gpu_speed.py and bench/gpu_e2e.sh build their DVC working copies with `copy_pipeline`:
    every dependency in dvc.yaml must be in it or be some stage's output."""
    gpu_speed.copy_pipeline(tmp_path)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    made = {next(iter(o)) if isinstance(o, dict) else o
            for s in stages.values() for key in ("outs", "metrics", "plots") for o in s.get(key, [])}
    made = {m.split("${")[0].rstrip("/") for m in made}
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            if "${" in dep or any(dep == m or dep.startswith(m + "/") or m.startswith(dep + "/") for m in made):
                continue
            assert (tmp_path / dep).exists(), f"{name} depends on {dep}, which copy_pipeline leaves out"


def test_gpu_speed_trains_several_runs_at_once_through_dvc_on_a_cpu(tmp_path):
    """The `concurrent` step of bench/gpu_check.sh at toy size: a DVC copy with generated arrays,
    `resnorm.parallel -j 2` over two study runs, and the aggregate rate in speed.json. A second
    measurement in the same copy (another mode, or MPS) trains new stages: it must not find the
    first one's stages up to date and read their timing logs again."""
    out = tmp_path / "out"

    def concurrent(*extra: str, env: dict | None = None) -> None:
        r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "concurrent", "--jobs", "2",
                            "--device", "cpu", "--size", "16", "--images", "32", "--val", "16", "--epochs", "2",
                            "--work", str(tmp_path / "work"), "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "failed" not in r.stdout, r.stdout

    concurrent()
    result = json.loads((out / "speed.json").read_text())["concurrent"]["2"]
    assert result["runs"] == 2 and len(result["per_run_median"]) == 2 and result["batch"] == 32
    assert min(result["per_run_median"]) > 0 and result["projected_paper_study_hours"] > 0
    lock_path = tmp_path / "work" / "repo" / "dvc.lock"
    first = set(yaml.safe_load(lock_path.read_text())["stages"])
    assert {"study-train@bn-bs32-100", "study-train@bn-bs32-101"} <= first      # recorded as dvc repro would

    # the copy is kept between calls: code of fetch or prepare changed since it was made must not make
    # resnorm.parallel fetch and prepare the real data set over the generated arrays
    lock = yaml.safe_load(lock_path.read_text())
    for stage in ("fetch", "prepare"):
        for dep in lock["stages"][stage]["deps"]:
            if dep["path"] == f"src/resnorm/{stage}.py":
                dep["md5"] = "0" * 32               # as recorded with other code
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(tmp_path / "work" / "repo" / ".dvc" / "cache" / "runs")     # and never run with this code
    classes = (tmp_path / "work" / "repo" / "data" / "prepared" / "classes.json").read_text()
    concurrent("--concurrent-config", "gn:8", env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe")})
    assert (tmp_path / "work" / "repo" / "data" / "prepared" / "classes.json").read_text() == classes
    again = json.loads((out / "speed.json").read_text())["concurrent"]
    assert set(again) == {"2", "2:gn:8:mps"} and again["2:gn:8:mps"]["mps"] and again["2:gn:8:mps"]["batch"] == 8
    concurrent("--concurrent-config", "gn:8")              # the same variant again: new seeds, new stages
    lock = set(yaml.safe_load(lock_path.read_text())["stages"])
    assert {"study-train@gn-bs8-100", "study-train@gn-bs8-101", "study-train@gn-bs8-200", "study-train@gn-bs8-201"} <= lock
    # one resnorm.train alone, with PyTorch's cuDNN flag set before it (bench/gpu_check.sh's probe cudnnall)
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "single", "--configs", "bn:8",
                        "--cudnn-benchmark-limit", "0", "--device", "cpu", "--size", "16", "--images", "32",
                        "--val", "16", "--epochs", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    single = json.loads((out / "speed.json").read_text())["single"]["bn:8|cudnn-limit-0"]
    assert single["median"] > 0 and single["train_images"] == 32 and single["epoch_over_train_time"] > 1
    assert single["cudnn_benchmark_limit"] == 0 and len(single["images_per_second"]) == 1     # epoch 2 of 2
    # the work copy's params.yaml persists: a later call's --epochs must still hold (3 epochs: 2 steady ones)
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "single", "--configs", "bn:8",
                        "--device", "cpu", "--size", "16", "--images", "32", "--val", "16", "--epochs", "3",
                        "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(json.loads((out / "speed.json").read_text())["single"]["bn:8"]["images_per_second"]) == 2


def test_study_runs_counts_each_variant_times_the_seeds_by_batch_size(tmp_path):
    """A variant without its own batch_size trains at the top-level one, as resnorm.params reads it; the
    single experiment (stage `train`, top-level batch size) is one training more."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"batch_size": 32, "study": {"seeds": [0, 1, 2], "variants": {
        "bn-bs32": {"norm": "bn"}, "gn-bs8": {"norm": "gn", "batch_size": 8}, "ln-bs32": {"norm": "ln", "batch_size": 32}}}}))
    assert gpu_speed.study_runs(params) == {32: 7, 8: 3}
    assert gpu_speed.study_runs(params, skip=("ln-bs32",)) == {32: 4, 8: 3}
    params.write_text(yaml.safe_dump({"batch_size": 128, "study": {"seeds": [0], "variants": {"gn-bs8": {"norm": "gn", "batch_size": 8}}}}))
    assert gpu_speed.study_runs(params) == {128: 1, 8: 1}


def test_the_projection_gives_the_readmes_hours_from_the_readmes_figures():
    """README: 33 runs at batch 32 or 128 at about 4,850 images/s together (measured with 4,096 train
    and 512 val images), 6 at batch 8 at 2,749 (3,072 and 512), validation adding 4% to an epoch there;
    the paper epoch is 24,706 train images (the test split carved out of the 30,000) and 7,500 val:
    about 3.4 hours, 3.0 for the assignment's 11 variants (39 and 33 study runs, each with the single
    experiment's training, which the pipeline runs too)."""
    runs = gpu_speed.study_runs()
    assert sum(runs.values()) == 40 and runs[8] == 6
    assert gpu_speed.paper_epoch() == (24_706, 7_500)             # 30,000 x 0.70 / 0.85
    fast = {"rate": 4850, "overhead": 1.04, "extra": 0.0, "jobs": 4, "val_ratio": 512 / 4096}
    routes = {8: {"rate": 2749, "overhead": 1.04, "extra": 0.0, "jobs": 1, "val_ratio": 512 / 3072},
              32: fast, 128: fast}
    assert round(gpu_speed.study_hours(runs, routes), 1) == 3.4
    assert round(gpu_speed.study_hours(gpu_speed.study_runs(skip=("bn-bs32-es", "gn-bs32-es")), routes), 1) == 3.0
    # validation's share scales with val per train image: 4% at 1/8 is 9.7% at 7,500 / 24,706
    assert gpu_speed.paper_overhead(fast, (24_706, 7_500)) == pytest.approx(1 + 0.04 * (7_500 / 24_706) * 8)
    assert gpu_speed.paper_overhead({"overhead": 1.04}, (24_706, 7_500)) == 1.04     # ratio not recorded
    # each wave's compile counts once per wave: 6 runs one at a time are 6 waves, 4 at once 2
    slower = gpu_speed.study_hours(runs, {**routes, 8: {**routes[8], "extra": 60.0}})
    assert abs((slower - gpu_speed.study_hours(runs, routes)) * 3600 - 6 * 60) < 1e-6


def test_the_paper_epoch_follows_the_split_in_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"split": {"train": 0.8, "val": 0.1, "test": 0.1}}}))
    assert gpu_speed.paper_epoch(params) == (round(30_000 * 0.8 / 0.9), 7_500)


def _project(tmp_path, speed: dict, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "speed.json").write_text(json.dumps(speed))
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "project", "--out", str(out),
                        *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, json.loads((out / "speed.json").read_text())


def _single(median: int, epoch1: float = 20.0, images: int = 3072, **more) -> dict:
    return {"median": median, "epoch1_seconds": epoch1, "train_images": images, **more}


def _together(runs: int, batch: int, compile_, together: int) -> dict:
    return {"runs": runs, "batch": batch, "compile": compile_, "together": together,
            "epoch_over_train_time": 1.04, "epoch1_extra_seconds": 30.0}


def test_the_project_phase_takes_the_fastest_measured_route_per_batch_size(tmp_path):
    """`gpu_speed.py --phase project`: one run at a time at the slowest norm measured, or j at once,
    whichever is faster at each batch size; figures from another call's speed.json merged in."""
    first = {"single": {"bn:8": _single(1081), "bn:8:reduce-overhead": _single(2749),
                        "gn:8:reduce-overhead": _single(2600), "bn:128": _single(4884, images=3072, epoch_over_train_time=1.1)}}
    second = {"concurrent": {"4": _together(4, 32, True, 4850),
                             "4:bn:8:reduce-overhead": _together(4, 8, "reduce-overhead", 5100)}}
    r, speed = _project(tmp_path, first)
    assert "no projection: nothing measured at batch 32" in r.stdout and "projection" not in speed
    (tmp_path / "second.json").write_text(json.dumps(second))
    r, speed = _project(tmp_path, first, "--results", str(tmp_path / "second.json"))
    routes = speed["projection"]["routes"]
    assert routes["8"]["rate"] == 5100 and routes["8"]["jobs"] == 4          # 4 at once beat 2,600 alone
    assert routes["32"]["rate"] == 4850
    assert routes["128"]["rate"] == 4884 and routes["128"]["jobs"] == 1
    assert routes["128"]["extra"] == 20.0 - 3072 / 4884                     # epoch 1 less one steady epoch
    assert routes["128"]["overhead"] == 1.1 and routes["8"]["overhead"] == 1.04     # each route's own
    runs = gpu_speed.study_runs()
    hours = gpu_speed.study_hours(runs, {int(b): r for b, r in routes.items()})
    assert speed["projection"]["hours"] == round(hours, 2)
    assert f"{hours:.2f} h" in r.stdout
    # without the concurrent batch-8 figure, batch 8 goes one at a time, at gn's 2,600 (slower than bn's)
    del second["concurrent"]["4:bn:8:reduce-overhead"]
    (tmp_path / "second.json").write_text(json.dumps(second))
    (tmp_path / "out" / "speed.json").unlink()
    _, speed = _project(tmp_path, first, "--results", str(tmp_path / "second.json"))
    assert speed["projection"]["routes"]["8"]["rate"] == 2600
    # the assignment's 11 variants: the batch-size study's own batch-32 arms left out
    r, speed = _project(tmp_path, first, "--results", str(tmp_path / "second.json"),
                        "--skip-variants", "bn-bs32-es,gn-bs32-es")
    assert speed["projection"]["runs"] == {"8": 6, "32": 22, "128": 6} and "without bn-bs32-es, gn-bs32-es" in r.stdout


def test_a_run_in_another_precision_is_a_route_of_its_own():
    """`--precision fp32` records "bn:32|fp32": the projection may take it, and names it."""
    results = {"single": {"bn:32": _single(4171, images=4096), "gn:32": _single(3869, images=4096),
                          "bn:32|fp32": _single(4500, images=4096, precision="fp32")}}
    route = gpu_speed.best_routes(results, 4096)[32]
    assert route["rate"] == 4500 and "fp32" in route["route"]
    results["single"]["bn:32|fp32"]["median"] = 3000      # slower than bf16's slowest norm (gn, 3,869)
    route = gpu_speed.best_routes(results, 4096)[32]
    assert route["rate"] == 3869 and "fp32" not in route["route"] and "2 norm(s)" in route["route"]


def test_the_profile_sorts_kernels_by_what_they_do():
    """bench/gpu_profile.py's kinds, on kernel names as cuDNN, inductor, cuBLAS and ATen print them:
    a Triton kernel is never a convolution whatever ops its name fuses, a cuBLAS or optimizer kernel
    is not element-wise, and a convolution's pass is named where the kernel says it."""
    import gpu_profile
    cases = {
        "sm80_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize64x64x64_stage4_"
        "warpsize1x1x4_g8_tensor16x8x16_execute_kernel__5x_cudnn": "convolution: weight gradient",
        "void cudnn::detail::wgrad_alg0_engine<float, 128, 6, 7, 3, 3, 5, false, 512>(int, int)":
            "convolution: weight gradient",
        "sm80_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x64x32": "convolution: input gradient",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x32x32_stage4_warpsize4x1x1_g1_"
        "tensor16x8x16_execute_kernel__5x_cudnn": "convolution: forward",
        "void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>": "convolution (pass",
        "aten::mkldnn_convolution": "convolution (pass",
        "triton_red_fused__native_batch_norm_legit_functional_convolution_backward_5": "fused reduction",
        "triton_per_fused_mean_3": "fused reduction",
        "triton_poi_fused_add_relu_threshold_backward_7": "fused element-wise",
        "void cudnn::bn_fw_tr_1C11_kernel_NHWC<__nv_bfloat16, float, float, 512, true, 1>": "batch norm",
        "void at::native::batch_norm_collect_statistics_channels_last_kernel<float>": "batch norm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "matrix multiply",
        "ampere_bf16_s16816gemm_bf16_64x64_ldg8_f2f_stages_64x5_tn": "matrix multiply",
        "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<3>, "
        "at::native::BinaryOpListAlphaFunctor<float, 3, 2, 2>>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "copy / fill",
        "Memcpy HtoD (Pageable -> Device)": "copy / fill",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float>>>":
            "reduction (other)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "element-wise (other)",
        "generatedNativePointwise": "other",
        "aten::_log_softmax_backward_data": "other",             # not a convolution's input gradient
    }
    for name, kind in cases.items():
        assert gpu_profile.kind_of(name).startswith(kind), (name, gpu_profile.kind_of(name))


def test_gpu_check_refuses_an_unknown_step_or_probe_before_any_work(tmp_path):
    """A misspelt name in STEPS or GOAL2 stops bench/gpu_check.sh at once with exit 2, before the
    tools step: on a lent device every minute before it would be lost."""
    for env in ({"STEPS": "goal2 bogus"}, {"STEPS": "goal2", "GOAL2": "mps8 nope"}):
        r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **env, "OUT": str(tmp_path / "out")})
        assert r.returncode == 2, r.stdout + r.stderr
        assert "unknown" in r.stderr and ("bogus" in r.stderr or "nope" in r.stderr)
        assert "== tools" not in r.stdout


def test_gpu_speed_refuses_a_single_epoch_before_any_work(tmp_path):
    """Rates come from epoch 2 on (epoch 1 compiles): one epoch would measure nothing, after minutes."""
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "concurrent", "--epochs", "1",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("--epochs 1: at least 2 (rates are "
                                                                            "read from epoch 2 on; epoch 1 compiles)")
    assert not (tmp_path / "work").exists()


def test_gpu_check_stops_a_step_that_outruns_the_budget_with_all_it_started(tmp_path):
    """A step that hangs (an MPS server that never answers, a stuck worker) is stopped when the
    budget runs out, with every process it started (timeout signals the whole process group), and
    the session goes on to its projection. A fake python stands in for the step's bench."""
    import time
    marker = "3017"                                   # a sleep of this length is the step's grandchild
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = bench/gpu_speed.py ] && [[ " $* " == *" --phase single "* ]]; '
                    f'then sleep {marker} & exec sleep 3000; fi\n'
                    f'if [ "$1" = -c ]; then exit 0; fi\n'          # the tools step's checks: at once, even on a busy machine
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    start = time.time()
    r = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "STEPS": "single32", "BUDGET": "41", "DEVICE": "cpu",
                            "PYTHON": str(fake), "OUT": str(tmp_path / "out")})
    took = time.time() - start
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped: the step's" in r.stdout and "budget ran out" in r.stdout, r.stdout
    assert "== the paper study's training time" in r.stdout                 # the session went on
    assert took < 41 + 20, took
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a process of the stopped step is still running"
