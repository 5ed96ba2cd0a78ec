"""Stage `report`: the study written up from its own numbers, as Markdown and self-contained HTML.

Reads metrics/study/*.json, plots/study/*/history.csv, the data report and the
Grad-CAM index; writes plots/report.md, plots/report.html, plots/figures/*.png
and the long-format curve files plots/curves/*.csv that `dvc plots show` draws
with one line per variant. Every observation is computed, none is canned.
"""
from __future__ import annotations

import base64
import html
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats as sps

from .assignment import DIFFERS, settings
from .data import PREPARED, batch_count
from .gradcam import MAP_MEASURES, map_tests, analysis as gradcam_analysis
from .io import console, no_options, read_csv, read_json, run_cli, save_figure, write_csv, write_json, write_text
from .params import Params, load_params
from .prepare import near_counts, skip_kind, split_against_shares
from .stats import Comparison, Family, binomial_se, compare, mean_interval, paired
from .summary import arch_summary, model_summary
from .transfer import describe as describe_transfer

SPLITS = ("train", "val", "test")
SCORES = ("accuracy", "micro_f1", "macro_f1")
CURVES = ("loss", "accuracy", "micro_f1", "macro_f1")
OUT = Path("plots")


# --------------------------------------------------------------------------- numbers

def load_runs(p: Params) -> dict[str, list[dict]]:
    """Evaluated runs per variant, in params order, each with its history attached."""
    runs: dict[str, list[dict]] = {v: [] for v in p.study.variants}
    for v in p.study.variants:
        for seed in p.study.seeds:
            f = Path("metrics/study") / f"{v}-{seed}.json"
            if f.exists():
                m = read_json(f)
                h = Path("plots/study") / f"{v}-{seed}" / "history.csv"
                m["history"] = [{k: float(x) for k, x in row.items()} for row in read_csv(h)] if h.exists() else []
                runs[v].append(m)
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float]) -> str:
    m, s = mean_sd(values)
    return "n/a" if math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def score(runs: list[dict], split: str, key: str) -> list[float]:
    return [r[split][key] for r in runs if r.get(split)]


def mean_curve(runs: list[dict], column: str) -> list[tuple[int, float]]:
    """Per-epoch mean over the seeds that reached that epoch."""
    by_epoch: dict[int, list[float]] = defaultdict(list)
    for r in runs:
        for row in r["history"]:
            by_epoch[int(row["epoch"])].append(row[column])
    return [(e, statistics.fmean(v)) for e, v in sorted(by_epoch.items())]


def curve_rows(runs: dict[str, list[dict]], variants: list[str]) -> list[dict]:
    rows = []
    for v in variants:
        for split in ("train", "val"):
            cols = {c: dict(mean_curve(runs[v], f"{split}_{c}")) for c in CURVES}
            for e in sorted(cols["loss"]):
                rows.append({"variant": v, "split": split, "epoch": e,
                             **{c: round(cols[c][e], 6) for c in CURVES}})
    return rows


# --------------------------------------------------------------------------- figures

def variant_colors(variants: list[str]) -> dict[str, str]:
    """One colour per variant of `study.variants`, in its order: the same in every figure of the
    report and in `dvc plots show` (the template below), so a variant never changes colour."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex
    palette = [to_hex(c) for c in colormaps["tab10"].colors] + \
        [to_hex(c) for c in colormaps["tab20"].colors[1::2]] + [to_hex(c) for c in colormaps["Dark2"].colors]
    return {v: palette[i % len(palette)] for i, v in enumerate(variants)}


DASHES = {"val": [1, 0], "train": [6, 4]}      # val solid, train dashed: in the figures and the plots page


def vega_template(colors: dict[str, str], log_y: bool = False) -> dict:
    """The `dvc plots` template of the study's curves (plots/curves/by_variant.json, and
    by_variant_log.json for losses, on a log axis as in the report's figures, where one early spike
    would flatten every later difference): colour = variant with the report's colours, dash =
    split as in the report, one panel per revision, so `dvc plots diff A B` puts A and B side by
    side on the same axes instead of drawing over each other."""
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": "<DVC_METRIC_DATA>"},
        "title": "<DVC_METRIC_TITLE>",
        "facet": {"column": {"field": "rev", "type": "nominal", "title": None}},
        "resolve": {"scale": {"y": "shared"}},
        "spec": {
            "width": 460, "height": 280,
            "mark": {"type": "line", "tooltip": {"content": "data"}},
            "encoding": {
                "x": {"field": "<DVC_METRIC_X>", "type": "quantitative", "title": "<DVC_METRIC_X_LABEL>"},
                "y": {"field": "<DVC_METRIC_Y>", "type": "quantitative", "title": "<DVC_METRIC_Y_LABEL>",
                      "scale": {"type": "log"} if log_y else {"zero": False}},
                "color": {"field": "variant", "type": "nominal", "sort": list(colors),
                          "scale": {"domain": list(colors), "range": list(colors.values())}},
                "strokeDash": {"field": "split", "type": "nominal",
                               "scale": {"domain": list(DASHES), "range": list(DASHES.values())}},
            },
        },
    }


def plot_curves(path: Path, runs: dict[str, list[dict]], variants: list[str], title: str,
                colors: dict[str, str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, c in zip(axes.flat, CURVES):
        for v in variants:
            if not runs[v]:
                continue
            for split in ("train", "val"):
                pts = mean_curve(runs[v], f"{split}_{c}")
                if pts:
                    style = {"dashes": DASHES[split]} if split == "train" else {"linestyle": "-"}
                    ax.plot(*zip(*pts), color=colors[v], label=f"{v} {split}", linewidth=1.4, **style)
            # spread over seeds for val: min-max band
            per_epoch = defaultdict(list)
            for r in runs[v]:
                for row in r["history"]:
                    per_epoch[int(row["epoch"])].append(row[f"val_{c}"])
            if len(runs[v]) > 1 and per_epoch:
                e = sorted(per_epoch)
                ax.fill_between(e, [min(per_epoch[k]) for k in e], [max(per_epoch[k]) for k in e],
                                color=colors[v], alpha=0.12, linewidth=0)
        ax.set_title({"loss": "loss (cross-entropy)", "accuracy": "accuracy (1 - error)",
                      "micro_f1": "micro-F1", "macro_f1": "macro-F1"}[c])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if c == "loss":
            ax.set_yscale("log")      # early spikes would flatten every later difference
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"{title}: mean over seeds (val solid, train dashed, band = val min-max over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.83, 0.96))
    save_figure(fig, path)


def plot_bars(path: Path, runs: dict[str, list[dict]], variants: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for j, split in enumerate(SPLITS):
        ms = [mean_sd(score(runs[v], split, "accuracy")) for v in variants]
        ax.bar([i + (j - 1) * width for i in range(len(variants))], [m for m, _ in ms], width,
               yerr=[s for _, s in ms], label=split, capsize=2)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylabel("accuracy (mean ± sd over seeds)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- statistics

def by_seed(runs: list[dict], split: str, key: str = "accuracy") -> dict[int, float]:
    return {int(r["seed"]): r[split][key] for r in runs if r.get(split)}


def ranking(runs: dict[str, list[dict]], variants: list[str]) -> list[str]:
    """Variants with test scores, best mean test accuracy first (test: the split nothing was selected on)."""
    have = [v for v in variants if score(runs[v], "test", "accuracy")]
    return sorted(have, key=lambda v: -statistics.fmean(score(runs[v], "test", "accuracy")))


NO_TEST = "n/a (fewer than 2 runs with scores)"      # where a test needs 2 or more scored runs a side


def diverged_note(runs: dict[str, list[dict]], variants: list[str]) -> list[str]:
    """A line naming the runs of `variants` that diverged: they have no scores, so tables show them as n/a."""
    diverged = [r["run"] for v in variants for r in runs[v] if r.get("status") == "diverged"]
    return [f"Diverged (no scores): {', '.join(diverged)}."] if diverged else []


def cell(c: Comparison | None) -> str:
    if c is None:
        return NO_TEST
    return f"{c.interval()}, p = {c.p:.2g}" + (" *" if c.significant else "")


def test_verdict(c: Comparison | None) -> tuple[str, str]:
    if c is None:
        return "n/a", "n/a"
    return c.test, "significant" if c.significant else "not significant"


def ranking_section(runs: dict[str, list[dict]], variants: list[str], n_test: int,
                    nn: str | None, family: Family | None = None) -> tuple[list[list[str]], list[str], int]:
    """The test-accuracy ranking table, its observations, and how many distinct tests it made
    (each recorded in `family`). `nn` is the no-normalization variant every other is tested
    against (None: none in the study)."""
    order = ranking(runs, variants)
    if not order:
        return [], ["No variant has test scores."], 0
    best = order[0]
    test_of = {v: by_seed(runs[v], "test") for v in order}
    vs_best = {v: compare(test_of[v], test_of[best]) for v in order if v != best}
    vs_nn = {v: compare(test_of[v], test_of[nn]) for v in order if nn in order and v != nn}
    family = Family() if family is None else family
    before = len(family)
    for other, tests_of in ((best, vs_best), (nn, vs_nn)):
        for v, c in tests_of.items():
            family.add(f"{v} minus {other}, test accuracy", "norms compared", c, key=("test", frozenset((v, other))))
    tests = len(family) - before
    rows, obs = [], []
    for i, v in enumerate(order, 1):
        test, val = score(runs[v], "test", "accuracy"), score(runs[v], "val", "accuracy")
        m, lo, hi = mean_interval(test)
        rows.append([str(i), v, fmt(test), "n/a" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]",
                     f"{binomial_se(m, n_test):.3f}", fmt(val), f"{statistics.fmean(val) - m:+.3f}" if val else "n/a",
                     cell(vs_best[v]) if v in vs_best else "—", cell(vs_nn[v]) if v in vs_nn else "—"])
    if len(order) >= 2:
        second = order[1]
        c = compare(test_of[best], test_of[second])
        obs.append(f"On test accuracy {best} ranks first ({statistics.fmean(score(runs[best], 'test', 'accuracy')):.3f}) "
                   f"and {second} second; first minus second = " + (c.describe() if c else "n/a (one run each)") + ".")
    if vs_nn:
        beat = [v for v, c in vs_nn.items() if c and c.significant and c.diff > 0]
        worse = [v for v, c in vs_nn.items() if c and c.significant and c.diff < 0]
        unclear = [v for v in vs_nn if v not in beat + worse]
        text = (f"{len(beat)} of {len(vs_nn)} normalized variants beat no normalization ({nn}) on test accuracy at "
                f"the 5% level, each tested on its own" + (f": {', '.join(beat)}" if beat else "")
                + " ('All tests' below corrects for the number of tests).")
        if worse:
            text += f" {', '.join(worse)} did significantly worse than {nn}."
        if unclear:
            text += f" For {', '.join(unclear)} the runs cannot tell them apart from {nn}."
        obs.append(text)
    gaps = {v: statistics.fmean(score(runs[v], "val", "accuracy")) - statistics.fmean(score(runs[v], "test", "accuracy"))
            for v in order if score(runs[v], "val", "accuracy")}
    if gaps:
        pos = sum(g > 0 for g in gaps.values())
        obs.append(f"Val accuracy exceeds test accuracy for {pos} of {len(gaps)} variants (by {min(gaps.values()):+.3f} "
                   f"to {max(gaps.values()):+.3f}). Val picked each run's checkpoint (its best epoch), so val scores "
                   "are biased upward; that is why the ranking uses test.")
    se = binomial_se(statistics.fmean(score(runs[best], "test", "accuracy")), n_test)
    obs.append(f"Test-set sampling error: one run's test accuracy on {n_test} images has a binomial standard error of "
               f"about {se:.3f} (column 'test s.e.'), a 95% interval of about ±{1.96 * se:.3f} for a new test set of that "
               "size. The seed spread and the paired tests above hold the test set fixed, so they do not include this "
               "error: a difference that is significant over seeds may still not carry over to new images.")
    train_gap = {v: statistics.fmean(score(runs[v], "train", "accuracy")) - statistics.fmean(score(runs[v], "test", "accuracy"))
                 for v in order if score(runs[v], "train", "accuracy")}
    if train_gap:
        hi_v, lo_v = max(train_gap, key=train_gap.get), min(train_gap, key=train_gap.get)
        obs.append(f"The largest train-test accuracy gap is {hi_v} ({train_gap[hi_v]:+.3f}), the smallest {lo_v} "
                   f"({train_gap[lo_v]:+.3f}).")
    return rows, obs + diverged_note(runs, variants), tests


def batch_protocol(p: Params, n_train: int) -> str:
    vs = p.variants("batch")
    if not vs:
        return ""
    t = vs[0].train
    rule = {"linear": f"scaled linearly with the batch size (lr x batch / {t.lr_reference_batch}; Goyal et al. 2017)",
            "none": "the same at every batch size"}[t.lr_scaling]
    lrs = ", ".join(f"{v.batch_size}: {v.lr:g}" for v in sorted({(v.batch_size, v.lr): v for v in vs}.values(),
                                                               key=lambda v: v.batch_size))
    sched = {"plateau": f"reduced x{t.gamma:g} after {t.plateau_patience + 1} epochs without a better val accuracy",
             "cosine": f"cosine over {t.epochs} epochs", "step": f"x{t.gamma:g} every {t.step_size} epochs",
             "constant": "constant"}[t.schedule]
    text = (f"One protocol for every run of this section: at most {t.epochs} epochs, {t.warmup_epochs} warm-up "
            f"epoch(s), learning rate {rule} (batch: lr = {lrs}), {sched}, and early stopping after "
            f"{t.early_stopping_patience} epochs without a better val accuracy; the checkpoint with the best val accuracy "
            "is evaluated. ")
    sizes = sorted({v.batch_size for v in vs})
    text += (f"On {n_train} training images an epoch is " + ", ".join(
        f"{batch_count(n_train, b)} steps at batch {b}" for b in sizes) + f", so the budget allows at most "
        f"{batch_count(n_train, sizes[-1]) * t.epochs} steps at batch {sizes[-1]} against "
        f"{batch_count(n_train, sizes[0]) * t.epochs} at batch {sizes[0]}. ")
    if t.schedule == "plateau" and t.early_stopping_patience > t.plateau_patience + 1:
        text += ("Since the rate is cut before the patience runs out, every run that stops early has annealed first "
                 "(a cosine over the full budget would still be near its peak rate when an early stop cuts it off). ")
    if t.lr_scaling == "linear":
        text += ("Why scale: with the same epoch budget, batch 128 takes 16x fewer steps than batch 8; at one learning "
                 "rate, batch size would change the total distance travelled as well as the noise of each step. Linear "
                 "scaling keeps lr/batch, the size of the per-sample update, the same, so what remains is the effect of "
                 "the batch itself, including the batch statistics that BN depends on.")
    else:
        text += ("The learning rate is not scaled with the batch (train.lr_scaling: none), so larger batches also "
                 "take fewer and not larger steps: part of any batch-size effect here is that.")
    return text


def batch_study(runs: dict[str, list[dict]], p: Params, family: Family | None = None
                ) -> tuple[list[list[str]], list[list[str]], list[str], int]:
    """Table rows, comparison rows and observations for the batch-size group (BN vs GN, one protocol),
    and how many tests it made (each recorded in `family`)."""
    family = Family() if family is None else family
    by_norm: dict[str, dict[int, str]] = defaultdict(dict)
    for v in p.variants("batch"):
        by_norm[v.norm][v.batch_size] = v.name
    rows, comps, obs = [], [], []
    for norm, sizes in sorted(by_norm.items()):
        for bs in sorted(sizes):
            v = p.variant(sizes[bs])
            rs = runs[v.name]
            ep = [r["epochs_trained"] for r in rs]
            best_ep = [r["best_epoch"] for r in rs]
            rows.append([norm, str(bs), v.name, f"{v.lr:g}", fmt(score(rs, "val", "accuracy")),
                         fmt(score(rs, "test", "accuracy")), fmt(score(rs, "test", "macro_f1")),
                         f"{statistics.fmean(ep):.1f}" if ep else "n/a",
                         f"{statistics.fmean(best_ep):.1f}" if best_ep else "n/a",
                         f"{sum(r.get('status') == 'early_stopped' for r in rs)} of {len(rs)}"])
    change: dict[str, tuple[dict[int, float], Comparison | None]] = {}
    tests = 0
    for norm, sizes in sorted(by_norm.items()):
        bss = sorted(sizes)
        pairs = [(bss[0], bss[-1])] + [(a, b) for a, b in zip(bss, bss[1:]) if (a, b) != (bss[0], bss[-1])]
        for small, large in pairs if len(bss) >= 2 else []:
            a, b = by_seed(runs[sizes[small]], "test"), by_seed(runs[sizes[large]], "test")
            name = f"{norm.upper()}: batch {small} minus batch {large}"
            c = family.add(name + ", test accuracy", "batch size", compare(a, b))
            tests += c is not None
            comps.append([name, cell(c), *test_verdict(c)])
            if (small, large) == (bss[0], bss[-1]):
                change[norm] = ({s: a[s] - b[s] for s in a if s in b}, c)
                obs.append(f"{norm.upper()}: test accuracy at batch {small} minus batch {large} = "
                           + (c.describe() if c else NO_TEST) + ".")
    if "bn" in change and "gn" in change:
        (d_bn, _), (d_gn, c_gn) = change["bn"], change["gn"]
        small, large = min(by_norm["bn"]), max(by_norm["bn"])
        name = f"sensitivity: BN's change minus GN's ({small} vs {large})"
        c = family.add(name + ", test accuracy", "batch size", compare(d_bn, d_gn))
        tests += c is not None
        comps.append([name, cell(c), *test_verdict(c)])
        if c is None:
            obs.append("BN's and GN's sensitivity to batch size cannot be compared: that takes 2 or more seeds "
                       "scored at both batch sizes of each norm.")
        else:
            text = (f"Sensitivity (BN's change from batch {large} to {small} minus GN's) = {c.describe()}. ")
            if c.significant and c.diff < 0:
                text += ("BN loses more accuracy at the small batch than GN, beyond seed noise: consistent with Wu & "
                         "He's claim that GN is less sensitive to batch size, on this data and budget.")
            elif c.significant:
                text += "GN loses more accuracy at the small batch than BN here: against Wu & He's claim, on this data and budget."
            else:
                text += ("So these runs neither support nor refute Wu & He's claim that GN is less sensitive to batch "
                         "size than BN; it would take more seeds or a larger data set to tell.")
            obs.append(text)
        if c_gn is not None and not c_gn.significant:
            obs.append("GN's own change is not significant; that is a failure to detect a change, not a demonstration "
                       "that GN is insensitive to batch size.")
    return rows, comps, obs + diverged_note(runs, [v.name for v in p.variants("batch")]), tests


def gate_stats(p: Params) -> list[list[str]]:
    """BIN's learned gates, per layer over every seed's best checkpoint: mean, min, share at 0 and at 1."""
    import torch

    from .train import load_checkpoint, run_paths

    by_layer: dict[str, list] = defaultdict(list)
    for v in p.variants():
        if v.norm != "bin":
            continue
        for seed in p.study.seeds:
            best = run_paths(v.name, seed).best
            if best.exists():
                for k, t in load_checkpoint(best)["model"].items():
                    if k.endswith(".rho"):
                        by_layer[k.removesuffix(".rho")].append(t.clamp(0, 1))
    rows = []
    for layer, ts in by_layer.items():
        x = torch.cat(ts)
        rows.append([layer, str(x.numel()), f"{x.mean():.3f}", f"{x.min():.3f}", f"{(x <= 0).float().mean():.0%}",
                     f"{(x >= 1).float().mean():.0%}"])
    if by_layer:
        x = torch.cat([t for ts in by_layer.values() for t in ts])
        rows.append(["all layers", str(x.numel()), f"{x.mean():.3f}", f"{x.min():.3f}",
                     f"{(x <= 0).float().mean():.0%}", f"{(x >= 1).float().mean():.0%}"])
    return rows


# --------------------------------------------------------------------------- rendering

class Doc:
    """A report built once as blocks, rendered to Markdown and to self-contained HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str): self.blocks.append(("h", level, text))
    def p(self, text: str): self.blocks.append(("p", text))
    def ul(self, items: list[str]): self.blocks.append(("ul", items))
    def table(self, head: list[str], rows: list[list[str]]): self.blocks.append(("table", head, rows))
    def img(self, rel: str, alt: str): self.blocks.append(("img", rel, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif b[0] == "table":
                out.append("\n".join(["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                                     + ["| " + " | ".join(r) + " |" for r in b[2]]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    @staticmethod
    def inline(text: str) -> str:
        """Escaped HTML with the two Markdown marks the report uses, **bold** and `code`."""
        out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))
        out = re.sub(r"`(.+?)`", r"<code>\1</code>", out)
        return out.replace(" ± ", "&nbsp;±&nbsp;")        # a mean and its spread never wrap apart

    def html(self, base: Path) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'><title>ResNet normalization study</title>"
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}"
               "img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{self.inline(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{self.inline(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in b[1]) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{self.inline(c)}</td>" for c in r) + "</tr>"
                                     for r in b[2]) + "</table>")
            elif b[0] == "img":
                data = base64.b64encode((base / b[1]).read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        return "\n".join(out) + "</body></html>\n"


def study_table(runs: dict[str, list[dict]], variants: list[str]) -> list[list[str]]:
    return [[v, str(len(runs[v]))] + [fmt(score(runs[v], s, k)) for s in SPLITS for k in SCORES]
            for v in variants]


def engines_text(runs: dict[str, list[dict]]) -> str:
    """Which engines computed the runs (from their records): bit-identical reruns need the same one."""
    counts: dict[str, int] = {}
    for r in (r for rs in runs.values() for r in rs):
        e = r.get("engine")
        key = "not recorded" if not e else (
            f"{e['device']}, {e['norm_ops']}, {e['threads']} thread(s), "
            f"{'no compile' if e['compile'] is False else 'torch.compile ' + str(e['compile'])}, torch {e['torch']}")
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{n} run(s): {k}" for k, n in counts.items())


def settings_rows(p: Params, data: dict) -> tuple[list[list[str]], list[str]]:
    """The settings table's rows (a differing status in bold) and the names of the differing settings."""
    rows, differ = [], []
    for r in settings(p, data):
        if r.status == DIFFERS:
            differ.append(r.name)
        rows.append([r.name, r.assignment, r.this_run, f"**{r.status}**" if r.status == DIFFERS else r.status])
    return rows, differ


def multiple_comparisons(family: Family, seeds: int) -> tuple[list[str], list[list[str]], str, list[str]]:
    """Every distinct test of the report with its Holm-adjusted p-value: table head, rows, the lead
    paragraph and the observations."""
    tests = family.corrected()
    m = len(tests)
    raw = [name for name, _, c, _ in tests if c.significant]
    kept = [name for name, _, c, q in tests if q < 1 - c.confidence]
    rows = [[name, section, c.interval(), c.test, f"{c.p:.2g}", f"{q:.2g}",
             "significant" if q < 1 - c.confidence else "not significant"] for name, section, c, q in tests]
    lead = (f"The sections above make {m} distinct tests, each at the 5% level on its own. With that many, even if "
            f"no two variants truly differed, about {0.05 * m:.1f} would come out significant by chance. Holm's "
            f"step-down correction (Holm 1979) keeps the chance of even one false 'significant' among all {m} at 5%, "
            "whatever the dependence between the tests: the smallest p-value is multiplied by the number of tests, "
            "the next by one fewer, and so on ('Holm p', made non-decreasing). The intervals are each test's own "
            "95% intervals, not simultaneous ones.")
    obs = [f"Uncorrected, {len(raw)} of {m} tests are significant at 5%"
           + (f" ({'; '.join(raw)})" if raw else "") + ". "
           + (f"After Holm's correction {len(kept)} {'remains' if len(kept) == 1 else 'remain'}: {'; '.join(kept)}." if kept else
              "After Holm's correction none remains: no difference in this report holds once the number of tests is "
              "counted, so each single 'significant' above is a lead to test again, not a finding.")]
    if seeds >= 2 and m:
        def need(n: int, alpha: float) -> str:      # |t| a paired t over n seeds must pass at two-sided alpha
            return f"{float(sps.t.isf(alpha / 2, n - 1)):.1f}"
        more = [n for n in (5, 10) if n > seeds]
        obs.append(f"With {seeds} seeds a paired t-test has {seeds - 1} degree(s) of freedom, so passing the strictest "
                   f"Holm threshold (p < 0.05 / {m} = {0.05 / m:.2g}) takes |t| > {need(seeds, 0.05 / m)}, and the "
                   f"loosest (p < 0.05) |t| > {need(seeds, 0.05)}."
                   + ("".join(f" With {n} seeds the two bars are {need(n, 0.05 / m)} and {need(n, 0.05)}." for n in more)
                      + " More seeds lower the bar, and for a real difference they also raise |t|, which grows with "
                        "the square root of the number of seeds." if more else ""))
    return ["test", "section", "difference [95% CI]", "test kind", "p", "Holm p", "after correction"], rows, lead, obs


def split_notes(data: dict) -> str:
    """What prepare's report.json says against the splits, as sentences: classes split off their
    shares (`uneven_splits`) and val or test images nearly the same as one in train
    (`near_duplicates_of_train`); "" for a data set with neither."""
    text = ""
    uneven = data.get("uneven_splits", [])
    if uneven:
        text += (f" {len(uneven)} class(es) are split off their shares: a group of near-duplicates (dHash within "
                 "data.near_duplicate_bits) goes to one split whole, and one was too large to place: "
                 + "; ".join(f"{u['class']}, {split_against_shares(u)} (largest group {u['largest_group']})"
                             for u in uneven) +
                 ". Their scores on the small split rest on fewer images than its fraction suggests.")
    near = data.get("near_duplicates_of_train", [])
    if near:
        text += (f" {near_counts(near)} image(s) have a near-duplicate in train (the given split folders; "
                 "dHash within data.near_duplicate_bits; each is listed with it in data/prepared/report.json), so "
                 "their scores may be better than new photos would get.")
    return text


def class_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """The data section's table: images per class and split, and, where prepare's report.json has
    `uneven_splits` or `near_duplicates_of_train`, a column that marks the classes they name, so a
    reader of a class's scores sees it where the counts are."""
    notes: dict[str, list[str]] = defaultdict(list)
    for u in data.get("uneven_splits", []):
        notes[u["class"]].append(f"split off its shares (largest group {u['largest_group']})")
    near: dict[str, list[dict]] = defaultdict(list)
    for r in data.get("near_duplicates_of_train", []):
        near[r["class"]].append(r)
    for c, mine in near.items():
        notes[c].append(f"{near_counts(mine)} near a train image")
    header = ["class", *SPLITS] + (["note"] if notes else [])
    return header, [[c, *(str(v[s]) for s in SPLITS)] + (["; ".join(notes.get(c, []))] if notes else [])
                    for c, v in data["per_class"].items()]


def near_duplicate_section(runs: dict[str, list[dict]], variants: list[str],
                           family: Family | None = None) -> tuple[list[list[str]], list[str]]:
    """Val (and test) accuracy with and without the images that have a near-duplicate in train
    (evaluate's `without_near_train`): a row per variant and split, and per split a sentence with
    one paired t-test over every scored run (recorded in `family`: one test a split, not one a
    variant, so the norms' comparisons are not corrected for 13 more). ([], []) where no run has them."""
    rows, text = [], []
    for split in ("val", "test"):
        per_variant = {v: [r for r in runs[v] if r.get(split) and r.get("without_near_train", {}).get(split)]
                       for v in variants}
        scored = [r for mine in per_variant.values() for r in mine]
        if not scored:
            continue
        for v, mine in per_variant.items():
            if mine:
                a = [r[split]["accuracy"] for r in mine]
                b = [r["without_near_train"][split]["accuracy"] for r in mine]
                diff = round(statistics.fmean(a) - statistics.fmean(b), 3) + 0.0      # no "-0.000"
                rows.append([v, split, fmt(a), fmt(b), f"{diff:+.3f}"])
        w = scored[0]["without_near_train"][split]
        k, m = w["excluded"], w["images"]
        own = statistics.fmean(r["without_near_train"][split]["excluded_accuracy"] for r in scored)
        rest = statistics.fmean(r["without_near_train"][split]["accuracy"] for r in scored)
        lead = (f"{split.capitalize()} scored without its {k} image(s) that have a near-duplicate in train (see the "
                f"data section), on the other {m}. The runs' mean accuracy is {own:.3f} on those images and "
                f"{rest:.3f} on the rest; {split} accuracy with them minus without")
        if len(scored) < 2:
            text.append(lead + f": {NO_TEST}.")
            continue
        c = paired([r[split]["accuracy"] for r in scored], [r["without_near_train"][split]["accuracy"] for r in scored])
        if family is not None:
            family.add(f"{split} accuracy: with vs without its near-duplicates of train", "near-duplicates", c)
        text.append(lead + f", over all {len(scored)} scored runs (the run the unit): {c.describe()}.")
    return rows, text


def report(p: Params) -> Doc:
    runs = load_runs(p)
    names = list(p.study.variants)
    base = [v.name for v in p.variants("norms")]
    batch = [v.name for v in p.variants("batch")]
    data = read_json(PREPARED / "report.json")
    classes = read_json(PREPARED / "classes.json")
    family = Family()
    doc = Doc()
    doc.h(1, "ResNet with different normalization schemes: study report")
    doc.p(f"Generated by `dvc repro` from metrics/study/*.json ({sum(map(len, runs.values()))} runs: "
          f"{len(names)} variants x seeds {list(p.study.seeds)}). Scores are mean ± sample standard deviation "
          f"over seeds. Micro-F1 equals accuracy for single-label classification; both are listed as the "
          f"assignment asks. Comparisons: a paired t-test over seeds where two variants share their seeds (same "
          f"initialisation and data order), Welch's t otherwise, each with its 95% confidence interval from the t "
          f"distribution for its degrees of freedom (with 3 seeds the critical value is 4.30, not 2). \"Not "
          f"significant\" means these runs cannot tell two variants apart, never that they are equal. Each test is at the "
          f"5% level on its own; 'All tests, corrected for multiple comparisons' below corrects them together.")

    doc.h(2, "Settings: assignment / this run")
    rows, differ = settings_rows(p, data)
    doc.table(["setting", "assignment", "this run", "status"], rows)
    doc.p(f"{len(differ)} setting(s) differ from the assignment" + (f": {', '.join(differ)}." if differ else ".")
          + " 'not stated' rows are this run's own choices where the assignment leaves the knob open. The README's "
          "paper-setting command reproduces the assignment (no row differs).")
    doc.p(f"Computed by: {engines_text(runs)}. On a CPU a rerun is bit-identical only on the same engine and "
          "thread count: the fused kernels and plain tensor ops, or 1 and 2 threads, round differently, and "
          "over 50 epochs that moves the scores.")

    doc.h(2, "Data set")
    reasons: dict[str, int] = defaultdict(int)
    for s in data["skipped"]:
        reasons[skip_kind(s["reason"])] += 1
    doc.p(f"Source `{data['root']}` ({data['layout']}), resized to {data['image_size']}x{data['image_size']}, "
          f"split with seed {data['seed']}: {data['classes']} classes, " +
          ", ".join(f"{data['images'][s]} {s}" for s in SPLITS) + " images. " +
          (f"Skipped {len(data['skipped'])} files: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
           + "." if data["skipped"] else "No file was skipped.") +
          (f" Dropped classes: {', '.join(data['dropped_classes'])}." if data["dropped_classes"] else "") +
          split_notes(data))
    doc.table(*class_table(data))

    doc.h(2, "Model")
    doc.p(model_text(p.model, len(classes), p.data.image_size))
    own = [v for v in p.variants() if v.model != p.model]
    if own:
        doc.p("Variants with their own model settings: " + "; ".join(
            f"{v.name}: " + ", ".join(f"{k} {getattr(v.model, k)}" for k in v.model.__dataclass_fields__
                                      if getattr(v.model, k) != getattr(p.model, k)) for v in own) + ".")
    transfers = {v: next((r["transfer"] for r in rs if r.get("transfer")), None) for v, rs in runs.items()}
    for v, t in transfers.items():
        if t:
            stats = t.get("input_stats")
            doc.p(f"{v} did not start from scratch: {describe_transfer(t)}; freeze {t['freeze']} "
                  f"({t['trainable_parameters']:,} parameters trained, {t['frozen_parameters']:,} frozen)"
                  + (f"; inputs normalized with the mean and std of {stats['from']}" if stats else "") + ".")

    doc.h(2, "All variants")
    head = ["variant", "seeds"] + [f"{s} {k.replace('_', '-')}" for s in SPLITS for k in SCORES]
    doc.table(head, study_table(runs, names))
    figs = OUT / "figures"
    colors = variant_colors(names)
    plot_bars(figs / "accuracy_bars.png", runs, names)
    doc.img("figures/accuracy_bars.png", "accuracy per variant and split")
    near_rows, near_text = near_duplicate_section(runs, names, family)
    if near_rows:
        doc.h(3, "Without the near-duplicates of train")
        for t in near_text:
            doc.p(t)
        doc.table(["variant", "split", "accuracy", "without near-duplicates", "difference of means"], near_rows)

    doc.h(2, "The norms compared")
    doc.p(f"Ranked on test accuracy, the split that selected nothing; val beside it. 'test s.e.' is the binomial "
          f"sampling error of one run's test accuracy on {data['images']['test']} images. 'vs best' and 'vs nn' give "
          f"the difference in test accuracy with its 95% confidence interval and p-value (* = significant at 5%, "
          f"uncorrected; 'All tests' below corrects for the number of tests).")
    nn = next((v for v in base if p.variant(v).norm == "nn"), None)
    rows, obs, _ = ranking_section(runs, base, data["images"]["test"], nn, family)
    doc.table(["rank", "variant", "test accuracy", "95% CI of mean", "test s.e.", "val accuracy", "val - test",
               "vs best", "vs nn"], rows)
    plot_curves(figs / "curves_norms.png", runs, base, "Norms", colors)
    doc.img("figures/curves_norms.png", "curves of every norm")
    doc.h(3, "Observations")
    doc.ul(obs)

    sanity = [v for v in base if p.variant(v).norm in ("bn", "torch_bn")]
    sanity_file = Path("metrics/sanity.json")
    if len(sanity) == 2 or sanity_file.exists():
        doc.h(2, "Sanity check: from-scratch BN against PyTorch's nn.BatchNorm2d")
        if sanity_file.exists():
            sc = read_json(sanity_file)
            doc.p(f"Direct evidence (stage `sanity`): both models from one initialisation, on the same "
                  f"{sc['steps']} training batches (batch {sc['batch_size']}, the real data order and augmentation), "
                  f"SGD at lr {sc['lr']:g}, in {sc['dtype']}. The loss went from {sc['first_loss']:.3f} to "
                  f"{sc['last_loss']:.3f}; the largest differences between the two over all steps were:")
            doc.table(["quantity", "largest difference"],
                      [["loss", f"{sc['max_loss_difference']:.1e}"], ["logits", f"{sc['max_logit_difference']:.1e}"],
                       ["parameters (largest is " + f"{sc['largest_parameter']:.2f})", f"{sc['max_parameter_difference']:.1e}"],
                       ["running mean / variance", f"{sc['max_running_stat_difference']:.1e}"]])
            doc.p("Differences at the level of float64 rounding (about 1e-16 per operation, grown by the steps) mean "
                  "the two layers compute the same function and the same gradients. The float32 runs below diverge "
                  "slowly through rounding order alone, so their curves are close, not identical.")
        if len(sanity) == 2:
            a, b = sanity
            rows, obs = [], []
            for split in ("val", "test"):
                c = family.add(f"{a} minus {b}, {split} accuracy", "sanity check",
                               compare(by_seed(runs[a], split), by_seed(runs[b], split)),
                               key=(split, frozenset((a, b))))
                if c is not None:
                    rows.append([split, fmt(score(runs[a], split, "accuracy")), fmt(score(runs[b], split, "accuracy")),
                                 cell(c), c.test])
            doc.table(["split", a, b, f"{a} - {b} [95% CI]", "test"], rows)
            pairs = {r["seed"]: r for r in runs[a]}
            for r in runs[b]:
                if r["seed"] in pairs and r["history"] and pairs[r["seed"]]["history"]:
                    ha, hb = pairs[r["seed"]]["history"], r["history"]
                    k = min(len(ha), len(hb))
                    dl = max(abs(ha[i]["train_loss"] - hb[i]["train_loss"]) for i in range(k))
                    obs.append(f"seed {r['seed']} (float32, same initialisation and data order): largest per-epoch "
                               f"train-loss difference {dl:.2e} over {k} epochs.")
            doc.ul(obs)
            plot_curves(figs / "curves_sanity.png", runs, sanity, "BN (from scratch) vs torch_bn", colors)
            doc.img("figures/curves_sanity.png", "BN vs torch_bn curves")

    gates = gate_stats(p)
    if gates:
        doc.h(2, "BIN: the learned gates")
        doc.p(f"rho mixes BN (rho = 1) and IN (rho = 0) per channel. It starts at 1, learns at {p.model.bin_gate_lr:g}x "
              f"the learning rate without weight decay, and is clamped to [0, 1] after each step. Per layer, over "
              f"every seed's best checkpoint:")
        doc.table(["layer", "gates", "mean", "min", "share at 0", "share at 1"], gates)
        tot = gates[-1]
        doc.p(f"Over all layers the mean gate is {tot[2]} and {tot[5]} of the gates are still exactly 1 (pure BN); "
              f"{tot[4]} reached 0 (pure IN).")

    brows, comps, bobs, _ = batch_study(runs, p, family)
    if brows:
        doc.h(2, "Batch size: BN against GN")
        doc.p(batch_protocol(p, data["images"]["train"]))
        doc.table(["norm", "batch", "variant", "lr", "val accuracy", "test accuracy", "test macro-F1",
                   "epochs trained", "best epoch", "early-stopped"], brows)
        doc.p("Differences in test accuracy, paired over seeds (* = significant at 5%, uncorrected):")
        doc.table(["comparison", "difference [95% CI], p", "test", "verdict"], comps)
        doc.ul(bobs)
        plot_curves(figs / "curves_batch.png", runs, batch, "Batch-size study", colors)
        doc.img("figures/curves_batch.png", "batch-size curves")

    index_path = OUT / "gradcam" / "index.json"
    if index_path.exists():
        index = read_json(index_path)
        per_class, overall = gradcam_analysis(index)
        doc.h(2, "Grad-CAM")
        doc.p(f"Best variant by mean val accuracy (the selection split): {index['variant']} "
              f"({index['mean_val_accuracy']:.3f}); maps from its best seed, {index['run']}, on {index['split']} images, "
              f"for the true class over {len(index['target_layers'])} conv layers "
              f"({', '.join(index['target_layers'])}), mean-aggregated by pytorch-grad-cam. Concentration is the "
              f"share of a map's mass in its top 10% of pixels (0.10 for a flat map); central-quarter mass the share "
              f"inside the middle half of each axis (0.25 for a flat map). Wrong examples also get the map of the "
              f"class they were taken for.")
        doc.h(3, "Overall")
        doc.ul(overall)
        for name, text in per_class.items():
            doc.h(3, name)
            doc.p(text)
            doc.img(f"gradcam/grids/{name}.png", f"Grad-CAM {name}")
        map_comparisons = map_tests(index)
        for key, label, _ in MAP_MEASURES:
            if key in map_comparisons:
                family.add(f"{label}: correct minus wrong maps", "Grad-CAM", map_comparisons[key][2])

    if family:
        doc.h(2, "All tests, corrected for multiple comparisons")
        head, rows, lead, obs = multiple_comparisons(family, len(p.study.seeds))
        doc.p(lead)
        doc.table(head, rows)
        doc.ul(obs)

    inside_section(doc)

    curves = OUT / "curves"
    write_csv(curves / "norms.csv", curve_rows(runs, base))
    write_csv(curves / "sanity.csv", curve_rows(runs, sanity))
    write_csv(curves / "batch.csv", curve_rows(runs, batch))
    write_json(curves / "by_variant.json", vega_template(colors))
    write_json(curves / "by_variant_log.json", vega_template(colors, log_y=True))
    return doc


def model_text(m, num_classes: int, size: int) -> str:
    """The Model section's paragraph: the architecture, its size, and the choices that shape it."""
    if m.arch != "resnet6n2":
        s = arch_summary(m.arch, num_classes, size, "bn", gn_groups=m.gn_groups, dropout=m.dropout)
        return (f"torchvision's {m.arch} ({s['depth']} weighted layers on the main path, {s['weighted_layers']} with "
                f"its projection shortcuts), {s['params']:,} parameters with BN ({num_classes} classes), "
                f"{s['macs'] / 1e6:,.1f} M multiply-accumulates per {size}x{size} image; torchvision's own "
                f"builder with this project's norm as `norm_layer`; GN uses {m.gn_groups} groups"
                + (f"; dropout {m.dropout:g} before the classifier" if m.dropout else "") + ".")
    s = model_summary(m.n, num_classes, size, "bn", m.gn_groups, m.shortcut, m.block)
    return (f"ResNet-{6 * m.n + 2} (n = {m.n}): {s['weighted_layers']} weighted layers (every conv and the linear "
            f"layer counted), {s['params']:,} parameters with BN ({num_classes} classes), "
            f"{s['macs'] / 1e6:,.1f} M multiply-accumulates per {size}x{size} image; widths 16/32/64 at full, half "
            f"and quarter resolution; "
            + ("a norm after every conv" if m.block == "basic" else "pre-activation blocks (He et al. 2016: norm, "
               "ReLU, conv, twice, then the addition; a final norm and ReLU before the pool)") + "; "
            + ("identity shortcuts, subsampled with stride 2 and zero-padded where the width doubles (option A, no "
               "parameters)" if m.shortcut == "A" else "1x1 stride-2 projection shortcuts where the width doubles "
               "(option B)") + f"; GN uses {m.gn_groups} groups"
            + (f"; dropout {m.dropout:g} before the classifier" if m.dropout else "") + ".")


def inside_section(doc: Doc) -> None:
    """Inside the best model (stage visualize): its kernels, feature maps and what its norms do."""
    path = Path("metrics/visualize.json")
    if not path.exists():
        return
    vz = read_json(path)
    doc.h(2, "Inside the best model")
    k = vz["kernels"]
    doc.p(f"{vz['run']} ({vz['arch']}, norm {vz['norm']}), in eval mode, on {vz['split']} images (stage "
          f"`visualize`). Its first conv layer has {k['kernels']} kernels of {k['size'][0]}x{k['size'][1]}, shown as "
          f"RGB with each kernel scaled to its own range (mean L2 norm {k['weight_norm_mean']:.2f}, largest "
          f"{k['weight_norm_max']:.2f}).")
    doc.img("visualize/kernels.png", "first-layer kernels")
    doc.p("Feature maps of the stem and of each stage: the most active channels over the images shown, the same "
          "channels for every image. " + "; ".join(
              f"{f['name']}: {f['width']} channels at {f['size'][0]}x{f['size'][1]}" for f in vz["feature_maps"]) + ".")
    doc.img("visualize/feature_maps.png", "feature maps")
    rows = [[s["stage"], str(s["layers"]), f"{s['mean_before']:+.3f}", f"{s['mean_after']:+.3f}",
             f"{s['std_before']:.3f}", f"{s['std_after']:.3f}", f"{s['std_after'] / s['std_before']:.2f}"
             if s["std_before"] else "n/a"] for s in vz["stages"]]
    doc.p(f"What the norms do, over {vz['stat_images']} images: per stage, the mean over its norm layers of the "
          f"activation mean and standard deviation at each layer's input (before) and output (after, before the "
          f"ReLU). The ratio after/before is the factor by which the layers rescale what they receive.")
    doc.table(["stage", "norm layers", "mean before", "mean after", "std before", "std after", "std ratio"], rows)
    spread = [s["std_before"] for s in vz["stages"]]
    after = [s["std_after"] for s in vz["stages"]]
    if len(spread) > 1 and min(spread) > 0 and min(after) > 0:
        doc.p(f"Across stages the input scale varies by a factor {max(spread) / min(spread):.1f} "
              f"({min(spread):.3f} to {max(spread):.3f}) and the output scale by {max(after) / min(after):.1f} "
              f"({min(after):.3f} to {max(after):.3f}).")
    doc.img("visualize/activations.png", "activation statistics before and after each norm")
    if vz.get("augmentation"):
        a = vz["augmentation"]
        doc.p(f"What {vz['run']} trained on: {a['images']} train images as prepared, then {a['draws']} random draws of "
              f"its training augmentation ({a['settings']}) as the training loop feeds them to the model, with the "
              f"normalization undone (a cutout square shows the train mean).")
        doc.img("visualize/augmentation.png", "training augmentation")


STUDY_SUMMARY = Path("metrics/summary/study.json")


def study_summary(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per variant, the mean val and test accuracy over its seeds: the study's declared DVC metrics
    (short keys, numbers only, so `dvc metrics diff` and `dvc exp show` stay narrow)."""
    out = {}
    for v, rs in runs.items():
        val, test = score(rs, "val", "accuracy"), score(rs, "test", "accuracy")
        if val and test:
            out[v] = {"val": round(statistics.fmean(val), 4), "test": round(statistics.fmean(test), 4)}
    return out


def main(argv: list[str]) -> None:
    no_options(argv, "report", __doc__, "data.*, model.*, train.*, study.* and gradcam.*")
    p = load_params()
    write_json(STUDY_SUMMARY, study_summary(load_runs(p)))
    doc = report(p)
    write_text(OUT / "report.md", doc.markdown())
    write_text(OUT / "report.html", doc.html(OUT))
    console.print(f"report: {OUT}/report.md and {OUT}/report.html")


if __name__ == "__main__":
    run_cli(main)
