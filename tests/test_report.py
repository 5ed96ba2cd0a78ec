"""The report's settings table and batch-size statistics, on fixed inputs."""
import re
import shlex
import shutil

import pytest
from scipy import stats as sps

from resnorm.assignment import DIFFERS, OPEN, SAME, settings
from resnorm.params import load_params
from conftest import REPO, write_params

BIRDS_DATA = {"root": "/data/indian-birds", "layout": "given splits", "classes": 25,
              "images": {"train": 27_000, "val": 7_500, "test": 3_000}}
FOOD_DATA = {"root": "data/raw/ifct", "layout": "class folders", "classes": 10,
             "images": {"train": 284, "val": 62, "test": 60}}


def readme_paper_overrides() -> list[str]:
    """The -S arguments of the README's paper-setting command, as a shell would pass them."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### The paper setting"):]
    block = section[section.index("```bash"):].split("```")[1]
    command = next(line for line in block.replace("\\\n", " ").splitlines() if " -S " in line)
    args = shlex.split(command)
    return [args[i + 1] for i, a in enumerate(args) if a == "-S"]


def status(rows) -> dict[str, str]:
    return {r.name: r.status for r in rows}


def test_readme_paper_setting_reproduces_the_assignment(workdir):
    from dvc.utils.hydra import apply_overrides

    overrides = readme_paper_overrides()
    assert any(o.startswith("train.lr=") for o in overrides) and len(overrides) >= 10
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    apply_overrides(workdir / "params.yaml", overrides)      # what `dvc exp run -S` does to params.yaml
    p = load_params()
    assert p.train.lr == 1e-4 and p.data.image_size == 256 and len(p.gradcam.classes) == 7
    rows = settings(p, BIRDS_DATA)
    assert [r.name for r in rows if r.status == DIFFERS] == []
    assert status(rows)["shortcut"] == SAME and status(rows)["batch-size study"] == SAME
    assert status(rows)["momentum"] == OPEN


def test_default_cpu_setting_marks_each_deviation():
    rows = settings(load_params(REPO / "params.yaml"), FOOD_DATA)
    assert {r.name for r in rows if r.status == DIFFERS} == {
        "data set", "image size", "Nesterov", "learning rate", "warm-up", "weight decay", "augmentation",
        "epochs", "Grad-CAM split", "Grad-CAM classes"}
    assert len({r.name for r in rows}) == len(rows)


@pytest.mark.parametrize("override, row", [
    ({"model": {"shortcut": "B"}}, "shortcut"),
    ({"model": {"n": 3}}, "depth"),
    ({"model": {"arch": "resnet18"}}, "architecture"),
    ({"model": {"arch": "resnet18"}}, "depth"),
    ({"model": {"block": "preact"}}, "residual block"),
    ({"model": {"dropout": 0.2}}, "dropout"),
    ({"model": {"weights": "w.pth", "freeze": "stem"}}, "initialisation"),
    ({"study": {"variants": {"gn-r18": {"norm": "gn", "batch_size": 32, "arch": "resnet18"}}}}, "architecture"),
    ({"train": {"optimizer": "adam", "nesterov": False}}, "optimizer"),
    ({"train": {"label_smoothing": 0.1}}, "label smoothing"),
    ({"study": {"variants": {"gn-bs32": {"norm": "gn", "batch_size": 32, "early_stopping_patience": 3}}}},
     "norm comparison: early stopping"),
    ({"study": {"variants": {"bn-bs8": {"norm": "bn", "batch_size": 8, "group": "batch",
                                        "early_stopping_patience": 5}}}}, "batch-size study"),
])
def test_a_deviation_is_marked(workdir, override, row):
    write_params(workdir, override)
    assert status(settings(load_params(), BIRDS_DATA))[row] == DIFFERS


def test_every_augmentation_is_named_in_the_order_it_is_applied(workdir):
    """The paper setting (no augmentation) with cutout or jitter turned on differs, in words a reader can check."""
    from dvc.utils.hydra import apply_overrides
    shutil.copy(REPO / "params.yaml", workdir / "params.yaml")
    apply_overrides(workdir / "params.yaml", readme_paper_overrides() + [
        "train.augment=true", "train.crop_padding=0", "train.hflip=false", "train.cutout=16", "train.color_jitter=0.3",
        "train.rotate=10", "train.zoom=0.15"])
    row = next(r for r in settings(load_params(), BIRDS_DATA) if r.name == "augmentation")
    assert row.status == DIFFERS
    assert row.this_run == "crop (pad 0) + rotation ±10° + zoom ±0.15 + colour jitter 0.3 + cutout 16 px"


def fake_runs(values: dict[str, list[float]]) -> dict[str, list[dict]]:
    return {v: [{"run": f"{v}-{s}", "seed": s, "status": "finished", "epochs_trained": 10, "best_epoch": 6,
                 "history": [], **{sp: {"accuracy": x, "macro_f1": x / 2} for sp in ("train", "val", "test")}}
                for s, x in enumerate(xs)] for v, xs in values.items()}


def test_batch_study_is_paired_over_seeds_with_intervals(workdir):
    write_params(workdir, {})
    p = load_params()
    from resnorm.report import batch_study
    acc = {"bn-bs8-es": [0.40, 0.45, 0.43], "bn-bs32-es": [0.55, 0.56, 0.50], "bn-bs128-es": [0.52, 0.58, 0.55],
           "gn-bs8-es": [0.50, 0.49, 0.52], "gn-bs32-es": [0.51, 0.50, 0.53], "gn-bs128-es": [0.48, 0.52, 0.50]}
    rows, comps, obs, tests = batch_study(fake_runs(acc), p)
    assert len(rows) == 6 and tests == 7
    bn = next(c for c in comps if c[0] == "BN: batch 8 minus batch 128")
    ref = sps.ttest_rel(acc["bn-bs8-es"], acc["bn-bs128-es"])
    ci = ref.confidence_interval()
    diff = (sum(acc["bn-bs8-es"]) - sum(acc["bn-bs128-es"])) / 3
    assert bn[1].startswith(f"{diff:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}], p = {ref.pvalue:.2g}")
    assert bn[2] == "paired t"
    d_bn = [a - b for a, b in zip(acc["bn-bs8-es"], acc["bn-bs128-es"])]
    d_gn = [a - b for a, b in zip(acc["gn-bs8-es"], acc["gn-bs128-es"])]
    sens = next(c for c in comps if c[0].startswith("sensitivity"))
    assert f"p = {sps.ttest_rel(d_bn, d_gn).pvalue:.2g}" in sens[1]
    text = " ".join(obs)
    assert "confirm" not in text and "predicts" not in text
    if "not significant" in sens[3]:
        assert "neither support nor refute" in text


def test_batch_study_names_diverged_runs_and_why_a_test_is_missing(workdir):
    """Runs that diverged have no scores: the section says which ones, and a missing test says it lacks
    scored runs, not runs (there were 3 of them)."""
    write_params(workdir, {})
    p = load_params()
    from resnorm.report import batch_study
    acc = {"bn-bs8-es": [0.40, 0.45, 0.43], "bn-bs32-es": [0.55, 0.56, 0.50], "bn-bs128-es": [0.52, 0.58, 0.55],
           "gn-bs8-es": [0.50, 0.49, 0.52], "gn-bs32-es": [0.51, 0.50, 0.53], "gn-bs128-es": [0.48, 0.52, 0.50]}
    runs = fake_runs(acc)
    for r in runs["gn-bs128-es"]:
        r.update(status="diverged", message="loss is nan")
        for split in ("train", "val", "test"):
            del r[split]
    rows, comps, obs, tests = batch_study(runs, p)
    assert tests == 4                                   # GN's two tests against 128 and the sensitivity drop out
    gn = next(c for c in comps if c[0] == "GN: batch 8 minus batch 128")
    assert gn[1] == "n/a (fewer than 2 runs with scores)"
    text = " ".join(obs)
    assert "Diverged (no scores): gn-bs128-es-0, gn-bs128-es-1, gn-bs128-es-2." in text
    assert "2 or more seeds scored at both batch sizes" in text


def test_the_report_names_the_engines_that_computed_the_runs():
    from resnorm.report import engines_text
    cpu = {"device": "cpu", "norm_ops": "fused CPU kernels", "threads": 1, "compile": False, "torch": "2.14.1"}
    gpu = {"device": "NVIDIA H100 80GB HBM3", "norm_ops": "tensor ops", "threads": 2, "compile": "reduce-overhead",
           "torch": "2.11.0"}
    runs = {"bn-bs32": [{"engine": cpu}, {"engine": cpu}], "bn-bs8-es": [{"engine": gpu}, {}]}
    assert engines_text(runs) == (
        "2 run(s): cpu, fused CPU kernels, 1 thread(s), no compile, torch 2.14.1; "
        "1 run(s): NVIDIA H100 80GB HBM3, tensor ops, 2 thread(s), torch.compile reduce-overhead, torch 2.11.0; "
        "1 run(s): not recorded")


def test_every_test_is_counted_once_and_holm_corrected():
    from resnorm.report import multiple_comparisons, ranking_section
    from resnorm.stats import Family, holm
    acc = {"bn": [0.600, 0.610, 0.620], "gn": [0.58, 0.50, 0.60], "in": [0.45, 0.40, 0.47],
           "nn": [0.300, 0.301, 0.302]}
    family = Family()
    _, obs, k = ranking_section(fake_runs(acc), list(acc), 60, "nn", family)
    # 3 against the best (bn), 3 against nn; bn against nn is one test shown twice
    assert k == len(family) == 5
    head, rows, lead, text = multiple_comparisons(family, seeds=3)
    text = [lead, *text]
    p = {r[0]: float(r[4]) for r in rows}
    holm_p = {r[0]: float(r[5]) for r in rows}
    names = [name for name, *_ in family.corrected()]
    assert list(p) == names and "nn minus bn, test accuracy" in p and "bn minus nn, test accuracy" not in p
    exact = holm([c.p for _, _, c, _ in family.corrected()])
    assert [holm_p[n] for n in names] == pytest.approx(exact, rel=0.05)      # the table rounds to 2 digits
    survivors = [n for n, q in zip(names, exact) if q < 0.05]
    assert survivors == ["nn minus bn, test accuracy"]                       # t(2) of about 58 survives x5
    raw = sum(c.significant for _, _, c, _ in family.corrected())
    assert raw > len(survivors)                                              # some do not survive the correction
    assert f"Uncorrected, {raw} of 5 tests" in text[1] and "After Holm's correction 1 remains: nn minus bn" in text[1]
    assert "|t| > 4.3" in text[2]                                            # t(2) at 5%, two-sided


def test_val_without_its_near_duplicates_of_train_is_one_paired_test_over_the_runs():
    """evaluate's `without_near_train` gives a row per variant and one paired t over every scored run
    a split (in the family, so corrected with the rest); a study without it gets no section."""
    from resnorm.report import near_duplicate_section
    from resnorm.stats import Family
    val = {"bn": [0.60, 0.62, 0.58], "gn": [0.50, 0.55, 0.53]}
    without = {"bn": [0.59, 0.60, 0.58], "gn": [0.49, 0.55, 0.51]}
    runs = {v: [{"run": f"{v}-{s}", "seed": s, "val": {"accuracy": val[v][s]},
                 "without_near_train": {"val": {"images": 95, "excluded": 5, "accuracy": without[v][s],
                                                "excluded_accuracy": (100 * val[v][s] - 95 * without[v][s]) / 5}}}
                for s in range(3)] for v in val}
    family = Family()
    rows, text = near_duplicate_section(runs, ["bn", "gn"], family)
    assert rows[0][:2] == ["bn", "val"] and rows[0][4] == "+0.010" and len(rows) == 2
    ref = sps.ttest_rel(val["bn"] + val["gn"], without["bn"] + without["gn"])
    [sentence] = text
    own = sum((100 * a - 95 * b) / 5 for v in val for a, b in zip(val[v], without[v])) / 6
    rest = sum(without["bn"] + without["gn"]) / 6
    assert sentence.startswith(f"Val scored without its 5 image(s) that have a near-duplicate in train (see the data "
                               f"section), on the other 95. The runs' mean accuracy is {own:.3f} on those images "
                               f"and {rest:.3f} on the rest; val accuracy with them minus without"), sentence
    assert "over all 6 scored runs" in sentence and f"t(5) = {ref.statistic:.2f}, p = {ref.pvalue:.3g}" in sentence
    assert len(family) == 1
    plain = {v: [{k: r[k] for k in ("run", "seed", "val")} for r in rs] for v, rs in runs.items()}
    assert near_duplicate_section(plain, ["bn", "gn"], Family()) == ([], [])
