"""End to end: the whole DVC pipeline on a tiny generated data set in a temporary repository."""
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_repo, make_dataset, write_params

VARIANTS = {"bn-bs8": {"norm": "bn", "batch_size": 8}, "bin-bs8": {"norm": "bin", "batch_size": 8},
            "bn-bs4": {"norm": "bn", "batch_size": 4, "group": "batch"},
            "gn-bs4": {"norm": "gn", "batch_size": 4, "group": "batch"}}
SEEDS = [0, 1]


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def ran(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = make_dataset(root / "images", classes=3, per_class=14, size=20)
    repo = copy_repo(root / "repo")
    write_params(repo, {
        "norm": "bn", "batch_size": 8,
        "data": {"root": str(data), "image_size": 16, "min_images_per_class": 6,
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "model": {"n": 1},
        "train": {"epochs": 1, "warmup_epochs": 0, "threads": 1},
        "study": {"seeds": SEEDS, "variants": VARIANTS},
        "gradcam": {"classes": ["class_0", "class_2"], "per_kind": 2},
        "sanity": {"steps": 3},
    })
    log = dvc(repo, "repro")
    return repo, log


def test_every_declared_output_exists(repo):
    repo, log = repo
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    runs = [f"{v}-{s}" for v in VARIANTS for s in SEEDS]
    assert {f"study-train@{r}" for r in runs} <= set(stages)
    assert {f"study-evaluate@{r}" for r in runs} <= set(stages)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            assert (repo / out["path"]).exists(), (name, out["path"])
    for r in runs:
        assert (repo / "metrics/study" / f"{r}.json").exists()
    for f in ("report.md", "report.html", "gradcam/index.json", "gradcam/grids/class_0.png", "curves/norms.csv",
              "curves/batch.csv", "figures/curves_norms.png", "visualize/kernels.png", "visualize/feature_maps.png",
              "visualize/activations.png"):
        assert (repo / "plots" / f).exists(), f
    html = (repo / "plots/report.html").read_text()
    assert "data:image/png;base64," in html and "<strong>differs</strong>" in html
    md = (repo / "plots/report.md").read_text()
    for heading in ("## Settings: assignment / this run", "## The norms compared", "## Sanity check",
                    "## BIN: the learned gates", "## Batch size: BN against GN", "## Grad-CAM", "### Overall",
                    "## Inside the best model"):
        assert heading in md, heading
    sanity = json.loads((repo / "metrics/sanity.json").read_text())
    assert sanity["steps"] == 3 and sanity["max_loss_difference"] < 1e-8
    assert (repo / "data/raw/ifct/NOT_USED.txt").exists()       # another data.root: nothing fetched


def test_gradcams_right_and_wrong_are_evaluates(repo):
    """gradcam scores its split as evaluate does (`predict_as_validated`): the images it shows as right
    and wrong are as many as the best run's test confusion matrix allows, per class."""
    repo, _ = repo
    index = json.loads((repo / "plots/gradcam/index.json").read_text())
    assert index["split"] == "test"
    k = 2                                                                  # gradcam.per_kind above
    confusion = list(csv.DictReader(open(repo / "plots/study" / index["run"] / "confusion.csv")))
    for name, entry in index["classes"].items():
        row = [r for r in confusion if r["actual"] == name]
        right = sum(int(r["count"]) for r in row if r["predicted"] == name)
        wrong = sum(int(r["count"]) for r in row) - right
        assert entry["available"] == {"images": right + wrong, "correct": min(k, right), "wrong": min(k, wrong)}
        for e in entry["examples"]:
            assert (e["predicted"] == name) == (e["kind"] == "correct")


def test_report_table_matches_metrics_files(repo):
    repo, _ = repo
    import json
    md = (repo / "plots/report.md").read_text()
    header = next(l for l in md.splitlines() if l.startswith("| variant | seeds"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    for v in VARIANTS:
        row = next(l for l in md.splitlines() if l.startswith(f"| {v} |"))
        cells = dict(zip(cols, [c.strip() for c in row.strip("|").split("|")]))
        for split in ("train", "val", "test"):
            for key, col in (("accuracy", "accuracy"), ("macro_f1", "macro-f1"), ("micro_f1", "micro-f1")):
                vals = [json.loads((repo / "metrics/study" / f"{v}-{s}.json").read_text())[split][key] for s in SEEDS]
                assert cells[f"{split} {col}"] == f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    summary = json.loads((repo / "metrics/summary/study.json").read_text())
    for v in VARIANTS:
        for split in ("val", "test"):
            vals = [json.loads((repo / "metrics/study" / f"{v}-{s}.json").read_text())[split]["accuracy"] for s in SEEDS]
            assert summary[v][split] == round(statistics.fmean(vals), 4)


def test_second_repro_runs_nothing_and_one_edit_reruns_only_its_variant(repo):
    repo, _ = repo
    assert ran(dvc(repo, "repro")) == set()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"]["variants"]["gn-bs4"]["lr"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(repo, "status")
    changed = set(re.findall(r"^(\S+):", status, re.M))
    # the report reads every variant's settings, so it depends on all of `study`
    assert changed == {"study-train@gn-bs4-0", "study-train@gn-bs4-1", "report"}, status
    stages = ran(dvc(repo, "repro"))
    assert {s for s in stages if s.startswith("study-")} == {
        "study-train@gn-bs4-0", "study-train@gn-bs4-1", "study-evaluate@gn-bs4-0", "study-evaluate@gn-bs4-1"}
    assert stages - {s for s in stages if s.startswith("study-")} <= {"gradcam", "visualize", "report"}
    assert "Data and pipelines are up to date" in dvc(repo, "status")


def test_dvc_exp_run_trains_the_chosen_variant(repo):
    repo, _ = repo
    import json
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=env)
    log = dvc(repo, "exp", "run", "-S", "norm=gn", "-S", "batch_size=8")
    assert ran(log) == {"train", "evaluate"}
    m = json.loads((repo / "metrics/experiment.json").read_text())
    assert (m["norm"], m["batch_size"], m["variant"]) == ("gn", 8, "gn-bs8")
    diff = dvc(repo, "metrics", "diff")
    assert "metrics/summary/experiment.json" in diff and "test.acc" in diff, diff
    assert max(map(len, diff.splitlines())) <= 120, diff          # fits a 120-column terminal
    shown = dvc(repo, "metrics", "show")
    assert {l.split()[0] for l in shown.splitlines()[1:] if l.strip()} == {
        "metrics/summary/experiment.json", "metrics/summary/study.json"}, shown      # only the two summaries
    shown = dvc(repo, "plots", "show", "-o", "dvc_plots")
    assert (repo / "dvc_plots" / "index.html").exists(), shown


def test_parallel_training_is_recorded_as_dvc_repro_would(repo, tmp_path):
    """`resnorm.parallel` trains stale runs concurrently and commits them: afterwards DVC sees them as
    up to date, and evaluating them gives the very metrics of the sequential `dvc repro`."""
    repo, _ = repo
    twin = copy_repo(tmp_path / "twin")
    shutil.copy(repo / "params.yaml", twin / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "resnorm.parallel", "-j", "2", "--train-only", "study-train@bn-bs8-*"],
                       cwd=twin, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 training stages, 2 to run, 2 at a time" in r.stderr, r.stderr
    assert r.stderr.count("recorded in dvc.lock") == 2
    stages = ran(dvc(twin, "repro", "study-evaluate@bn-bs8-0", "study-evaluate@bn-bs8-1"))
    assert stages == {"study-evaluate@bn-bs8-0", "study-evaluate@bn-bs8-1"}       # training is not redone
    for seed in SEEDS:
        name = f"metrics/study/bn-bs8-{seed}.json"
        assert (twin / name).read_bytes() == (repo / name).read_bytes()
    again = subprocess.run([sys.executable, "-m", "resnorm.parallel", "--train-only", "study-train@bn-bs8-*"],
                           cwd=twin, env=env, capture_output=True, text=True)
    assert "2 training stages, 0 to run" in again.stderr, again.stderr
    bad = subprocess.run([sys.executable, "-m", "resnorm.parallel", "study-train@nothing-*"],
                         cwd=twin, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.parametrize("args, words", [(["-j", "0"], "argument -j/--jobs: 0 is not allowed: at least 1"),
                                         (["-j", "two"], "argument -j/--jobs: 'two' is not a whole number")])
def test_parallel_refuses_a_bad_job_count_in_one_line(args, words, capsys):
    """-j is checked as resnorm.summary checks its counts (io.positive_int): exit 2, the option named."""
    from resnorm.parallel import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and words in err[-1]


@pytest.mark.parametrize("override, words", [
    ("train.lr=abc", "params: train.lr = 'abc' is not allowed: expected a finite number"),
    ("nosuch.key=1", "Invalid `--set-param` value: Could not override 'nosuch.key'."),   # DVC's reason, not only its label
    ("train.lr", "Invalid `--set-param` value"),
])
def test_parallel_refuses_a_bad_override_and_leaves_params_as_they_were(tmp_path, override, words):
    import shutil
    from resnorm.io import UserError
    from resnorm.parallel import set_params

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_bytes()
    with pytest.raises(UserError) as e:
        set_params(["train.epochs=3", override], params)
    assert str(e.value).startswith(f"-S train.epochs=3 -S {override}: {words}"), str(e.value)
    assert "\n" not in str(e.value) and params.read_bytes() == before


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_parallel_refuses_a_bad_stall_limit(value):
    from resnorm.io import UserError
    from resnorm.parallel import main

    with pytest.raises(UserError, match="--stall-after = .* is not allowed: seconds > 0, or 0 for never"):
        main(["--stall-after", value])


def test_parallel_status_line_reads_each_runs_epoch_and_the_time_left(tmp_path):
    import time
    from types import SimpleNamespace
    from resnorm.parallel import LOGS, Job, job_for, run_of, status_line
    from resnorm.params import load_params
    from resnorm.train import TIMING_COLUMNS
    assert run_of("python -m resnorm.train --variant gn-bs8-es --seed 2") == ("gn-bs8-es", 2)
    assert run_of("python -m resnorm.train") == (None, None)
    params = load_params(REPO / "params.yaml")
    stage = lambda name, args: SimpleNamespace(addressing=name, cmd=f"python -m resnorm.train {args}", wdir=".")
    bn = job_for(stage("study-train@bn-bs32-1", "--variant bn-bs32 --seed 1"), params)
    assert (bn.epochs, bn.threads, bn.log) == (params.train.epochs, params.train.threads,
                                               LOGS / "study-train_bn-bs32-1.log")
    assert job_for(stage("x", "--variant nope --seed 0"), params).epochs == 0          # not known: no bound
    timing = tmp_path / "logs" / "timing"
    timing.mkdir(parents=True)
    head = ",".join(TIMING_COLUMNS)
    started = time.time() - 60
    job = lambda stage, args, epochs: Job(stage, f"python -m resnorm.train {args}".strip(), str(tmp_path),
                                          tmp_path / "log", started=started, epochs=epochs)
    (timing / "bn-bs32-0.csv").write_text(f"{head}\n1,10.0,9.0,800,0,\n2,12.0,11.0,700,0,\n")
    (timing / "experiment.csv").write_text(f"{head}\n1,30.0,28.0,300,0,\n")
    (timing / "gn-bs32-1.csv").write_text(f"{head}\n30,9.0,8.0,900,0,\n")        # an earlier run's log
    os.utime(timing / "gn-bs32-1.csv", (started - 600, started - 600))
    running = [job("study-train@bn-bs32-0", "--variant bn-bs32 --seed 0", 50), job("train", "", 30),
               job("study-train@gn-bs32-1", "--variant gn-bs32 --seed 1", 50)]
    waiting = [job("study-train@in-bs32-0", "--variant in-bs32 --seed 0", 50)]
    line = status_line(running, 5, waiting, slots=3)
    assert "bn-bs32-0 epoch 2/50, train epoch 1/30, gn-bs32-1 starting" in line, line
    assert "3 running" in line and "5 done, 1 waiting" in line
    # 48 x 12 s + 29 x 30 s, and the waiting run's 50 epochs at the mean 21 s: 2,496 s over 3 slots
    assert line.endswith("about 14 min left if no run stops early"), line
    assert "left" not in status_line([running[2]], 0, [], slots=1)                  # nothing measured yet
    assert status_line(running[:1], 0, [], slots=4, failed=2).endswith(             # one run: its own 48 x 12 s,
        "0 done, 2 failed, 0 waiting; about 10 min left if no run stops early")     # however many slots
    assert status_line([job("train", "", 3)], 0, [], slots=1).endswith("about 60 s left if no run stops early")


def test_a_run_out_of_gpu_memory_beside_others_starts_again_with_fewer_at_once(tmp_path):
    """Fake runs: `big` fails with PyTorch's out-of-memory error while another runs, and succeeds alone.
    It is started again after `slow` ends, then at most 1 at once; a run that fails so alone fails."""
    from resnorm.parallel import Job, run_jobs
    events = tmp_path / "events.txt"
    def fake(name: str, seconds: float, oom_unless_alone: bool = False) -> str:
        code = (f"import os, sys, time\n"
                f"log = open({str(events)!r}, 'a'); log.write('start {name} ' + str(time.time()) + '\\n'); log.flush()\n"
                f"busy = [l for l in open({str(events)!r}) if l.startswith('running ')]\n")
        if oom_unless_alone:            # the first start waits until another run is going: no race
            marker = tmp_path / f"{name}.tried"
            code += (f"if not os.path.exists({str(marker)!r}):\n"
                     f"    open({str(marker)!r}, 'w').close()\n"
                     f"    t0 = time.time()\n"
                     f"    while not busy and time.time() - t0 < 30:\n"
                     f"        time.sleep(0.05)\n"
                     f"        busy = [l for l in open({str(events)!r}) if l.startswith('running ')]\n"
                     f"if busy:\n"
                     f"    sys.exit('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB')\n")
        code += (f"open({str(events)!r}, 'a').write('running {name}\\n')\n"
                 f"time.sleep({seconds})\n"
                 f"lines = open({str(events)!r}).read().replace('running {name}\\n', '')\n"
                 f"open({str(events)!r}, 'w').write(lines + 'end {name} ' + str(time.time()) + '\\n')\n")
        (tmp_path / f"{name}.py").write_text(code)
        return f"{sys.executable} {tmp_path / name}.py"
    jobs = [Job("study-train@slow-0", fake("slow", 1.5), str(tmp_path), tmp_path / "slow.log"),
            Job("study-train@big-0", fake("big", 0.1, oom_unless_alone=True), str(tmp_path), tmp_path / "big.log"),
            Job("study-train@after-0", fake("after", 0.1), str(tmp_path), tmp_path / "after.log")]
    done = []
    failed = run_jobs(jobs, 2, lambda job, rc: done.append((job.stage.split("@")[1], rc)))
    assert failed == [] and sorted(done) == [("after-0", 0), ("big-0", 0), ("slow-0", 0)]
    assert jobs[1].attempts == 2 and (tmp_path / "big.log").read_text().count("CUDA out of memory") == 1
    lines = events.read_text().splitlines()
    end_slow = float(next(l for l in lines if l.startswith("end slow")).split()[-1])
    starts_big = [float(l.split()[-1]) for l in lines if l.startswith("start big")]
    assert len(starts_big) == 2 and starts_big[1] > end_slow             # again only once slow had ended
    # out of memory alone: a real failure, not a loop
    (tmp_path / "events.txt").write_text("running someone-else\n")
    alone = Job("study-train@big-1", fake("big1", 0.1, oom_unless_alone=True), str(tmp_path), tmp_path / "big1.log")
    assert run_jobs([alone], 2, lambda job, rc: None) == [alone] and alone.attempts == 1


def test_a_run_that_writes_nothing_for_too_long_is_stopped_and_the_others_go_on(tmp_path):
    """--stall-after: `hung` writes a line and then nothing (a deadlocked loader, a hung GPU); it is
    stopped after 3 s of silence and counted as failed, unrecorded. `steady` writes a line every
    0.3 s for 4.5 s and `quick` ends at once: both are recorded. Without the limit nothing is stopped.
    A hung run used to hold its slot, and the `dvc repro` after the runs, forever."""
    import time
    from resnorm.io import console
    from resnorm.parallel import Job, run_jobs

    def job(name: str, code: str) -> Job:
        (tmp_path / f"{name}.py").write_text("import sys, time\n" + code)
        return Job(f"study-train@{name}-0", f"{sys.executable} {tmp_path / name}.py", str(tmp_path), tmp_path / f"{name}.log")
    jobs = [job("hung", "print('epoch 1', flush=True)\ntime.sleep(120)\n"),
            job("steady", "for i in range(15):\n    print('epoch', i, flush=True)\n    time.sleep(0.3)\n"),
            job("quick", "print('done')\n")]
    done = []
    t0 = time.time()
    with console.capture() as out:
        failed = run_jobs(jobs, 3, lambda j, rc: done.append((j.stage, rc)), stall_after=3.0)
    assert failed == [jobs[0]] and sorted(done) == [("study-train@quick-0", 0), ("study-train@steady-0", 0)]
    assert time.time() - t0 < 60 and jobs[0].process.returncode != 0
    assert "stalled study-train@hung-0: nothing in its log for 3 s; stopping it" in out.get()
    fine = job("fine", "print('epoch 1', flush=True)\ntime.sleep(2)\n")
    assert run_jobs([fine], 1, lambda j, rc: None) == [] and not fine.stalled
    from resnorm.parallel import stop_stalled            # a run gone between the poll and the signal: no crash
    gone = job("gone", "pass\n")
    gone.process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.process.wait()
    gone.started = time.time() - 100
    with console.capture():
        stop_stalled(gone, 1.0, time.time())
    assert gone.stalled


def test_oversubscribed_runs_wait_passively_and_keep_their_threads(tmp_path, monkeypatch):
    """More threads at once than cores: the runs get OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads made
    -j 2 seven times slower than -j 1 on 2 cores, with bit-identical histories); not when they fit, nor
    over a policy the user set. The runs' thread counts are left as they are."""
    from resnorm import parallel
    from resnorm.parallel import Job, run_jobs, wait_policy
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    jobs = [Job(f"study-train@r{i}-0", "", str(tmp_path), tmp_path / f"r{i}.log", threads=2) for i in range(3)]
    assert wait_policy(jobs, 2, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_policy(jobs, 1, 2) == {} and wait_policy(jobs, 2, 4) == {} and wait_policy(jobs[:1], 4, 2) == {}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert wait_policy(jobs, 2, 2) == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(parallel, "cpu_cores", lambda: 2)
    show = f"{sys.executable} -c \"import os; print(os.environ.get('OMP_WAIT_POLICY'))\""
    for slots, seen in ((2, "PASSIVE"), (1, "None")):
        runs = [Job(f"study-train@s{i}-0", show, str(tmp_path), tmp_path / f"s{slots}{i}.log", threads=2) for i in range(2)]
        assert run_jobs(runs, slots, lambda j, rc: None) == []
        assert {r.log.read_text().strip() for r in runs} == {seen}, slots


def test_runs_that_fail_alike_leave_the_waiting_ones_unstarted(tmp_path):
    """When max(2, -j) runs in a row fail with the same line (a card that cannot run the settings, a
    compiler that fails on every graph), the waiting runs are not started: they would fail alike,
    each after its start-up and compile. Runs that fail each in its own words, or with a run that
    ends well between them, do not stop the others."""
    from resnorm.io import console
    from resnorm.parallel import Job, run_jobs

    def job(name: str, code: str) -> Job:
        (tmp_path / f"{name}.py").write_text("import sys\n" + code)
        return Job(f"study-train@{name}-0", f"{sys.executable} {tmp_path / name}.py", str(tmp_path), tmp_path / f"{name}.log")
    card = "sys.exit(\"error: train.precision = 'bf16': Tesla T4 has compute capability 7.5\")\n"
    same = [job(f"same{i}", card) for i in range(6)]
    with console.capture() as out:
        assert run_jobs(same, 2, lambda j, rc: None) == same
    assert [j.attempts for j in same] == [1, 1, 0, 0, 0, 0]
    assert ("not starting the 4 waiting run(s): the last 2 failed alike (error: train.precision = 'bf16': "
            "Tesla T4 has compute capability 7.5), so they would too") in out.get()
    own = [job(f"own{i}", f"sys.exit('error: run {i} failed in its own way')\n") for i in range(4)]
    with console.capture():
        assert run_jobs(own, 2, lambda j, rc: None) == own
    assert all(j.attempts == 1 for j in own)
    mixed = [job("m0", card), job("m1", "pass\n"), job("m2", card), job("m3", card), job("m4", "pass\n")]
    with console.capture():
        assert run_jobs(mixed, 1, lambda j, rc: None) == [mixed[0], mixed[2], mixed[3], mixed[4]]
    assert [j.attempts for j in mixed] == [1, 1, 1, 1, 0]      # a run that ended well between the first two


def test_a_failed_run_is_named_with_the_line_that_says_why(tmp_path):
    """A failed run's line quotes the error its log names, not whatever came last (inductor's compile
    errors print pages of compiler output after the exception), and quotes it verbatim: a log line
    with [ ] once lost its text to rich's markup, and a stray "[/]" crashed resnorm.parallel itself."""
    from resnorm.io import console
    from resnorm.parallel import Job, failure_line, report_failure
    log = tmp_path / "[run].log"
    log.write_text("study-train@bn-bs8-0 epoch 1/50 ...\nTraceback (most recent call last):\n"
                   '  File "train.py", line 530, in train\n'
                   "torch._inductor.exc.InductorError: CppCompileError: C++ compile error [/] at [enforce fail]\n\n"
                   "Output:\n/tmp/x.cpp:89:54: error: 'decltype' evaluates to 'float'\n   89 |  auto t = x;\n"
                   "      |       ^~~~\n\n")
    why = "torch._inductor.exc.InductorError: CppCompileError: C++ compile error [/] at [enforce fail]"
    assert failure_line(log) == why
    with console.capture() as out:
        report_failure(Job("study-train@bn-bs8-0", "cmd", str(tmp_path), log), 1, 59.4)
    assert out.get().strip() == f"failed study-train@bn-bs8-0 (exit 1, 59 s): {why}  (log: {log})"
    # a stage's own one-line error, then a message of DVC's after it
    log.write_text("Traceback ...\nerror: gradcam.classes: 'Owl' not in the prepared data set\n"
                   "ERROR: failed to reproduce 'study-train@x'\n")
    assert failure_line(log) == "error: gradcam.classes: 'Owl' not in the prepared data set"
    log.write_text("no error named here\nthe last line\n\n")                 # none named: the last line
    assert failure_line(log) == "the last line"
    assert failure_line(tmp_path / "missing.log") == ""


def test_a_run_whose_record_fails_is_named_and_the_others_go_on(tmp_path):
    """`dvc commit` of one finished run raising (a full disk while caching) used to end
    resnorm.parallel, and with it every run still training; now that run is named, left unrecorded
    and counted as failed, and the others are recorded."""
    from resnorm.io import console
    from resnorm.parallel import Job, record_run, run_jobs

    class Repo:                       # DVC's Repo as record_run uses it
        committed = []

        def commit(self, stage, force):
            if stage.endswith("b-0"):
                raise OSError(28, "No space left on device [cache]")
            self.committed.append(stage)
    repo = Repo()
    jobs = [Job(f"study-train@{n}-0", f"{sys.executable} -c pass", str(tmp_path), tmp_path / f"{n}.log")
            for n in ("a", "b", "c")]
    with console.capture() as out:
        failed = run_jobs(jobs, 2, lambda job, rc: record_run(repo, job, rc))
    assert failed == [jobs[1]] and sorted(repo.committed) == ["study-train@a-0", "study-train@c-0"]
    assert ("not recorded study-train@b-0: `dvc commit` failed: [Errno 28] No space left on device [cache]; "
            "its outputs are kept") in out.get()


def test_a_signal_during_a_runs_record_is_delivered_after_it():
    """Also with another thread in the process (DVC's, or xdist's here), which a signal sent to the
    process may reach: a blocking mask on the main thread alone would let it through."""
    import signal
    import threading
    import time
    from resnorm.parallel import signals_held
    seen, stop = [], threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("term"))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pthread_kill(other.ident, signal.SIGTERM)   # as when the kernel hands it to that thread
            time.sleep(0.2)                          # the handler would run by now, outside the hold
            assert seen == []
            seen.append("record written")
        deadline = time.time() + 5
        while len(seen) < 2 and time.time() < deadline:      # Python runs the handler at its next check
            time.sleep(0.001)
        assert seen[:2] == ["record written", "term"] and set(seen[2:]) <= {"term"}
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()


def processes_in(folder: Path) -> list[int]:
    """The processes whose working directory is inside `folder` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="finds processes through Linux /proc")
def test_parallel_ended_by_sigterm_stops_its_runs_and_releases_the_lock(repo, tmp_path):
    """kill, timeout and a batch scheduler's cancel send SIGTERM. Each run is in a session of its own,
    so unless `resnorm.parallel` stops them they go on training, outside DVC's lock, after it exits."""
    import signal
    import time
    repo, _ = repo
    twin = copy_repo(tmp_path / "term")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 10_000                                      # longer than this test waits
    (twin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.Popen([sys.executable, "-m", "resnorm.parallel", "-j", "2", "--train-only", "study-train@bn-bs8-*"],
                         cwd=twin, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = [twin / "models" / "study" / f"bn-bs8-{s}" / "last.pt" for s in SEEDS]
    deadline = time.time() + 180
    while not all(c.exists() for c in checkpoints) and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)                                                     # both runs past their first epoch
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, out + err
    assert err.count("stopped study-train@bn-bs8-") == 2, err
    assert processes_in(twin) == []
    assert "study-train@bn-bs8-0" in dvc(twin, "status", "study-train@bn-bs8-0")   # the lock is free; not recorded


def cache_objects_intact(repo: Path) -> list[str]:
    """The DVC cache objects whose content no longer has the md5 they are filed under."""
    import hashlib
    bad = []
    for f in (repo / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        name = f.parent.name + f.name.removesuffix(".dir")
        if hashlib.md5(f.read_bytes()).hexdigest() != name:
            bad.append(str(f.relative_to(repo)))
    return bad


def test_hardlinked_cache_gives_the_same_runs_and_a_rerun_corrupts_no_cache_object(repo, tmp_path):
    """The paper setting's arrays are 7.4 GB: with `cache.type hardlink` the workspace and the DVC
    cache share one copy (the README suggests it). Outputs are then links into the cache. `dvc
    repro` unprotects a persisted output before its stage runs, but `resnorm.parallel` runs the
    stage's command itself, so a training that wrote into its old checkpoint in place would change
    a cached object behind DVC's back (as root, the read-only bit stops nothing). Every write
    here is temp file + rename."""
    repo, _ = repo
    twin = copy_repo(tmp_path / "linked")
    shutil.copy(repo / "params.yaml", twin / "params.yaml")
    dvc(twin, "config", "cache.type", "hardlink")
    stage = "study-train@bn-bs8-0"
    dvc(twin, "repro", stage)
    for out in ("data/prepared/train_x.npy", "models/study/bn-bs8-0/best.pt", "models/study/bn-bs8-0/last.pt"):
        assert (twin / out).stat().st_nlink == 2, out                        # one copy, not two
    lock = lambda r: yaml.safe_load((r / "dvc.lock").read_text())["stages"][stage]["outs"]
    assert lock(twin) == lock(repo)                                          # the very same run
    params = yaml.safe_load((twin / "params.yaml").read_text())
    params["study"]["variants"]["bn-bs8"]["lr"] = 0.02                       # the persisted run starts over
    (twin / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "resnorm.parallel", "--train-only", stage], cwd=twin, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "recorded in dvc.lock" in r.stderr, r.stdout + r.stderr
    assert lock(twin) != lock(repo)
    assert cache_objects_intact(twin) == []
    assert "Data and pipelines are up to date" in dvc(twin, "status", stage)


def test_forced_rerun_with_identical_results_changes_no_tracked_file(repo):
    """Wall-clock figures live in the untracked logs/, checkpoints are byte-stable, so rerunning
    stages that give the same results leaves dvc.lock and every file git tracks as they were."""
    repo, _ = repo
    def snapshot():
        files = [repo / "dvc.lock", *sorted((repo / "metrics").rglob("*")), *sorted((repo / "plots").rglob("*"))]
        return {f.relative_to(repo): f.read_bytes() for f in files
                if f.is_file() and "report.html" not in f.name}   # report.html: a DVC-cached output
    before = snapshot()
    stages = ("study-train@bn-bs8-0", "study-evaluate@bn-bs8-0")     # (gradcam, report: checked on full reruns)
    assert ran(dvc(repo, "repro", "-f", "-s", *stages)) == set(stages)
    after = snapshot()
    assert set(after) == set(before)
    changed = [str(f) for f in before if before[f] != after[f]]
    assert changed == [], changed
    assert (repo / "logs" / "timing" / "bn-bs8-0.csv").exists()


def test_queued_experiment_runs_the_code_it_was_queued_with(repo):
    """`pip install -e .` points `import resnorm` at one src/; a queued experiment must still run
    its own copy (the code its dvc.lock hashes), not the main workspace's, edited meanwhile."""
    repo, _ = repo
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    code = repo / "src" / "resnorm" / "evaluate.py"
    original = code.read_text()
    line = 'out["best_epoch"] = metrics["best_epoch"]'
    marked = original.replace(line, line + '\n    out["marker"] = 111')          # into the declared metrics
    assert marked != original
    code.write_text(marked)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "queued code", "--allow-empty"], cwd=repo, check=True, env=env)
    dvc(repo, "exp", "run", "--queue", "-n", "queued-gn", "-S", "norm=gn", "-S", "batch_size=4", "evaluate")
    code.write_text(marked.replace("= 111", "= 222"))           # edited while the queue waits
    try:
        dvc(repo, "exp", "run", "--run-all")
    finally:
        code.write_text(original)
    shown = dvc(repo, "exp", "show", "--json")
    assert '"marker": 111' in shown and '"marker": 222' not in shown, shown[:2000]


CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def browser(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Headless Chromium on `page`, no network: (the DOM after its scripts ran, its console messages)."""
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                        "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


def test_plots_page_renders_offline_in_a_real_browser(repo, tmp_path):
    """`dvc plots show` through .dvc/config's plots.html_template: vega, vega-lite and vega-embed are
    inlined, so the page loads nothing from the network, logs nothing to the console and draws every
    chart; the Grad-CAM grids are on it as images, and the charts are the ones dvc.yaml declares."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("no chromium here (apt-get install -y chromium)")
    repo, _ = repo
    dvc(repo, "plots", "show", "-o", str(tmp_path / "page"))
    page = tmp_path / "page" / "index.html"
    html = page.read_text()
    assert "<script src=" not in html and "cdn.jsdelivr" not in html        # nothing to fetch
    charts = html.count("vegaEmbed('#")
    declared = yaml.safe_load((repo / "dvc.yaml").read_text())
    top = [next(iter(d)) if isinstance(d, dict) else d for d in declared["plots"]]
    # every top-level chart + the experiment's confusion matrix and per-class bars; no per-run study charts
    assert charts == len([t for t in top if not t.startswith(("plots/gradcam", "plots/visualize"))]) + 2, charts
    assert "plots/study/" not in html
    grids = sorted((repo / "plots/gradcam/grids").glob("*.png"))
    assert len(grids) == 2 and html.count("<img") >= len(grids) + 3          # + the visualize stage's 3 figures
    dom, console = browser(page, tmp_path / "profile")
    html_tag = re.search(r"<html[^>]*>", dom)[0]               # the template's hook: errors, rejections, failed loads
    assert "data-page-errors" not in html_tag, html_tag
    # vega-embed 6.18 warns that a "v5" $schema is not "v5.2.0" (its semver check), and vega warns on
    # the empty sanity curves of this test's study (no torch_bn variant); anything else fails
    known = ("The input spec uses Vega-Lite v5,", "The compiled spec uses Vega v5,", "WARN Infinite extent",
             "WARN Scale bindings are currently only supported")
    assert [line for line in console if not any(k in line for k in known)] == [], console
    assert dom.count('class="marks"') == charts, "every chart drawn"
    spec = json.loads((repo / "plots/curves/by_variant.json").read_text())
    colors = spec["spec"]["encoding"]["color"]["scale"]
    assert colors["domain"] == list(VARIANTS) and len(set(colors["range"])) == len(VARIANTS)
