"""The GPU session's scripts, rehearsed on the CPU: a device is lent for 15 minutes now and then,
and a script that broke since the last one (a new dependency, a new check) would waste it."""
import json
import subprocess
import sys
from pathlib import Path

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
    `resnorm.parallel -j 2` over two study runs, and the aggregate rate in speed.json."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--phase", "concurrent", "--jobs", "2",
                        "--device", "cpu", "--size", "16", "--images", "32", "--val", "16", "--epochs", "2",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" not in r.stdout, r.stdout
    result = json.loads((out / "speed.json").read_text())["concurrent"]["2"]
    assert result["runs"] == 2 and len(result["per_run_median"]) == 2
    assert min(result["per_run_median"]) > 0 and result["projected_paper_study_hours"] > 0
    lock = yaml.safe_load((tmp_path / "work" / "repo" / "dvc.lock").read_text())["stages"]
    assert {"study-train@bn-bs32-200", "study-train@bn-bs32-201"} <= set(lock)      # recorded as dvc repro would
