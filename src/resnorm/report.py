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
import statistics
from collections import defaultdict
from pathlib import Path

from .data import PREPARED
from .io import console, read_csv, read_json, run_cli, save_figure, write_csv, write_text
from .params import Params, load_params
from .summary import model_summary

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

def plot_curves(path: Path, runs: dict[str, list[dict]], variants: list[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    colors = plt.get_cmap("tab10")
    for ax, c in zip(axes.flat, CURVES):
        for i, v in enumerate(variants):
            if not runs[v]:
                continue
            for split, style in (("train", "--"), ("val", "-")):
                pts = mean_curve(runs[v], f"{split}_{c}")
                if pts:
                    ax.plot(*zip(*pts), style, color=colors(i % 10), label=f"{v} {split}", linewidth=1.4)
            # spread over seeds for val: min-max band
            per_epoch = defaultdict(list)
            for r in runs[v]:
                for row in r["history"]:
                    per_epoch[int(row["epoch"])].append(row[f"val_{c}"])
            if len(runs[v]) > 1 and per_epoch:
                e = sorted(per_epoch)
                ax.fill_between(e, [min(per_epoch[k]) for k in e], [max(per_epoch[k]) for k in e],
                                color=colors(i % 10), alpha=0.12, linewidth=0)
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


# --------------------------------------------------------------------------- observations

def noise(a: list[float], b: list[float]) -> float:
    """Two standard errors of the difference of two means (seed noise); nan with one seed each."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    return 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def verdict(diff: float, band: float) -> str:
    if math.isnan(band):
        return "cannot be told from seed noise with one seed"
    return "beyond seed noise" if abs(diff) > band else "within seed noise"


def observations(runs: dict[str, list[dict]], base: list[str], p: Params) -> list[str]:
    out = []
    val = {v: score(runs[v], "val", "accuracy") for v in runs}
    ranked = sorted((v for v in base if val[v]), key=lambda v: -statistics.fmean(val[v]))
    if len(ranked) >= 2:
        a, b = ranked[0], ranked[1]
        d = statistics.fmean(val[a]) - statistics.fmean(val[b])
        out.append(f"On validation accuracy {a} ranks first ({statistics.fmean(val[a]):.3f}), ahead of {b} "
                   f"by {d:+.3f}; the gap is {verdict(d, noise(val[a], val[b]))} "
                   f"(2 standard errors: {noise(val[a], val[b]):.3f}).")
        last = ranked[-1]
        out.append("Ranking by mean val accuracy: " + " > ".join(
            f"{v} ({statistics.fmean(val[v]):.3f})" for v in ranked) + f"; {last} is last.")
    nn = next((v for v in base if v.startswith("nn-") and val[v]), None)
    if nn and ranked:
        normed = [v for v in ranked if v != nn]
        beat = [v for v in normed if statistics.fmean(val[v]) > statistics.fmean(val[nn])]
        out.append(f"{len(beat)} of {len(normed)} normalized variants beat no normalization ({nn}, "
                   f"{statistics.fmean(val[nn]):.3f}) on mean val accuracy.")
    gaps = {v: statistics.fmean(score(runs[v], "train", "accuracy")) - statistics.fmean(score(runs[v], "test", "accuracy"))
            for v in base if score(runs[v], "train", "accuracy") and score(runs[v], "test", "accuracy")}
    if gaps:
        worst = max(gaps, key=gaps.get)
        out.append(f"The largest train-test accuracy gap is {worst} ({gaps[worst]:+.3f}), the smallest "
                   f"{min(gaps, key=gaps.get)} ({gaps[min(gaps, key=gaps.get)]:+.3f}).")
    diverged = [r["run"] for v in runs for r in runs[v] if r.get("status") == "diverged"]
    if diverged:
        out.append(f"Diverged (no scores): {', '.join(diverged)}.")
    return out


def batch_study(runs: dict[str, list[dict]], p: Params) -> tuple[list[list[str]], list[str]]:
    """Table rows and observations for the norms that were trained at several batch sizes."""
    by_norm: dict[str, dict[int, str]] = defaultdict(dict)
    for name, spec in p.study.variants.items():
        by_norm[spec["norm"]][spec["batch_size"]] = name
    rows, obs = [], []
    drops = {}
    for norm, sizes in by_norm.items():
        if len(sizes) < 2:
            continue
        for bs in sorted(sizes):
            v = sizes[bs]
            ep = [r["epochs_trained"] for r in runs[v]]
            rows.append([norm, str(bs), v, fmt(score(runs[v], "val", "accuracy")),
                         fmt(score(runs[v], "test", "accuracy")), fmt(score(runs[v], "test", "macro_f1")),
                         f"{statistics.fmean(ep):.1f}" if ep else "n/a",
                         str(sum(r.get("status") == "early_stopped" for r in runs[v]))])
        small, large = min(sizes), sorted(sizes)[len(sizes) // 2] if len(sizes) > 2 else max(sizes)
        a, b = score(runs[sizes[small]], "val", "accuracy"), score(runs[sizes[large]], "val", "accuracy")
        if a and b:
            drops[norm] = (statistics.fmean(b) - statistics.fmean(a), noise(a, b), small, large)
    for norm, (d, band, small, large) in drops.items():
        obs.append(f"{norm}: going from batch {large} to batch {small} changes mean val accuracy by {-d:+.3f} "
                   f"({verdict(d, band)}).")
    if "bn" in drops and "gn" in drops and drops["bn"][2] == drops["gn"][2]:
        (bn_loss, bn_band, small, _), (gn_loss, gn_band, _, _) = drops["bn"], drops["gn"]
        more = "BN" if bn_loss > gn_loss else "GN"
        gap_band = math.hypot(bn_band, gn_band)
        text = f"At batch {small} BN loses {bn_loss:.3f} and GN {gn_loss:.3f} of mean val accuracy: "
        if verdict(bn_loss - gn_loss, gap_band) == "beyond seed noise":
            text += f"{more} loses {abs(bn_loss - gn_loss):.3f} more, beyond seed noise. "
        else:
            text += f"the gap ({abs(bn_loss - gn_loss):.3f}) is within seed noise, so neither is shown to be less sensitive. "
        gn_own = verdict(gn_loss, gn_band)
        text += (f"GN's own change is {gn_own}" + (", as Wu & He's batch-size insensitivity predicts."
                 if gn_own == "within seed noise" else ", so GN is not batch-size insensitive on this data and budget."))
        obs.append(text)
    return rows, obs


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

    def html(self, base: Path) -> str:
        out = ["<!doctype html><html><head><meta charset='utf-8'><title>ResNet normalization study</title>"
               "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px}"
               "img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "ul":
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b[1]) + "</ul>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in b[1]) + "</tr>"
                           + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                     for r in b[2]) + "</table>")
            elif b[0] == "img":
                data = base64.b64encode((base / b[1]).read_bytes()).decode()
                out.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        return "\n".join(out) + "</body></html>\n"


def study_table(runs: dict[str, list[dict]], variants: list[str]) -> list[list[str]]:
    return [[v, str(len(runs[v]))] + [fmt(score(runs[v], s, k)) for s in SPLITS for k in SCORES]
            for v in variants]


def report(p: Params) -> Doc:
    runs = load_runs(p)
    names = list(p.study.variants)
    bs_count: dict[int, int] = defaultdict(int)
    for spec in p.study.variants.values():
        bs_count[spec["batch_size"]] += 1
    base_bs = max(bs_count, key=lambda b: (bs_count[b], -b))
    base = [v for v in names if p.study.variants[v]["batch_size"] == base_bs]
    data = read_json(PREPARED / "report.json")
    classes = read_json(PREPARED / "classes.json")
    summ = model_summary(p.model.n, len(classes), p.data.image_size, "bn", p.model.gn_groups)
    doc = Doc()
    doc.h(1, "ResNet with different normalization schemes: study report")
    doc.p(f"Generated by `dvc repro` from metrics/study/*.json ({sum(map(len, runs.values()))} runs: "
          f"{len(names)} variants x seeds {list(p.study.seeds)}). Scores are mean ± sample standard deviation "
          f"over seeds. Micro-F1 equals accuracy for single-label classification; both are listed as the "
          f"assignment asks.")

    doc.h(2, "Data set")
    reasons: dict[str, int] = defaultdict(int)
    for s in data["skipped"]:
        r = s["reason"]
        reasons["in a dropped class" if r.startswith("class ") else r.split(" of ")[0].split(" (")[0].split(":")[0]] += 1
    doc.p(f"Source `{data['root']}` ({data['layout']}), resized to {data['image_size']}x{data['image_size']}, "
          f"split with seed {data['seed']}: {data['classes']} classes, " +
          ", ".join(f"{data['images'][s]} {s}" for s in SPLITS) + " images. " +
          (f"Skipped {len(data['skipped'])} files: " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
           + "." if data["skipped"] else "No file was skipped.") +
          (f" Dropped classes: {', '.join(data['dropped_classes'])}." if data["dropped_classes"] else ""))
    doc.table(["class", *SPLITS], [[c, *(str(v[s]) for s in SPLITS)] for c, v in data["per_class"].items()])

    doc.h(2, "Model")
    doc.p(f"ResNet-{6 * p.model.n + 2} (n = {p.model.n}): {summ['weighted_layers']} weighted layers, "
          f"{summ['params']:,} parameters with BN ({len(classes)} classes), "
          f"{summ['macs'] / 1e6:,.1f} M multiply-accumulates per {p.data.image_size}x{p.data.image_size} image; "
          f"widths 16/32/64 at full, half and quarter resolution; a norm after every conv; GN uses "
          f"{p.model.gn_groups} groups. Training: {p.train.optimizer} lr {p.train.lr}, schedule "
          f"{p.train.schedule}, {p.train.epochs} epochs, augmentation {'on' if p.train.augment else 'off'}.")

    doc.h(2, "All variants")
    head = ["variant", "seeds"] + [f"{s} {k.replace('_', '-')}" for s in SPLITS for k in SCORES]
    doc.table(head, study_table(runs, names))
    figs = OUT / "figures"
    plot_bars(figs / "accuracy_bars.png", runs, names)
    doc.img("figures/accuracy_bars.png", "accuracy per variant and split")
    plot_curves(figs / "curves_norms.png", runs, base, f"Norms at batch {base_bs}")
    doc.img("figures/curves_norms.png", "curves of every norm")
    doc.h(3, "Observations")
    doc.ul(observations(runs, base, p))

    sanity = [v for v in base if p.study.variants[v]["norm"] in ("bn", "torch_bn")]
    if len(sanity) == 2:
        doc.h(2, "Sanity check: from-scratch BN against PyTorch's nn.BatchNorm2d")
        a, b = sanity
        rows, obs = [], []
        for split in ("val", "test"):
            x, y = score(runs[a], split, "accuracy"), score(runs[b], split, "accuracy")
            if x and y:
                d = statistics.fmean(x) - statistics.fmean(y)
                rows.append([split, fmt(x), fmt(y), f"{d:+.4f}", f"{noise(x, y):.4f}", verdict(d, noise(x, y))])
        doc.table(["split", a, b, "difference", "2 s.e. (seed noise)", "verdict"], rows)
        pairs = {r["seed"]: r for r in runs[a]}
        for r in runs[b]:
            if r["seed"] in pairs and r["history"] and pairs[r["seed"]]["history"]:
                ha, hb = pairs[r["seed"]]["history"], r["history"]
                k = min(len(ha), len(hb))
                dl = max(abs(ha[i]["train_loss"] - hb[i]["train_loss"]) for i in range(k))
                obs.append(f"seed {r['seed']}: same initialisation and data order; largest per-epoch train-loss "
                           f"difference {dl:.2e} over {k} epochs.")
        doc.ul(obs)
        plot_curves(figs / "curves_sanity.png", runs, sanity, "BN (from scratch) vs torch_bn")
        doc.img("figures/curves_sanity.png", "BN vs torch_bn curves")

    rows, obs = batch_study(runs, p)
    if rows:
        doc.h(2, "Batch size: BN against GN")
        doc.table(["norm", "batch", "variant", "val accuracy", "test accuracy", "test macro-F1",
                   "epochs trained", "early-stopped runs"], rows)
        doc.ul(obs)
        batch_variants = [r[2] for r in rows]
        plot_curves(figs / "curves_batch.png", runs, batch_variants, "Batch-size study")
        doc.img("figures/curves_batch.png", "batch-size curves")

    index_path = OUT / "gradcam" / "index.json"
    if index_path.exists():
        index = read_json(index_path)
        doc.h(2, "Grad-CAM")
        doc.p(f"Best variant by mean val accuracy: {index['variant']} ({index['mean_val_accuracy']:.3f}); maps "
              f"from its best seed, {index['run']}, for the true class over {len(index['target_layers'])} "
              f"conv layers ({', '.join(index['target_layers'])}), mean-aggregated by pytorch-grad-cam.")
        for name, entry in index["classes"].items():
            doc.h(3, name)
            conf = [i["confidence"] for i in entry["wrong"]]
            wrong_as = defaultdict(int)
            for i in entry["wrong"]:
                wrong_as[i["predicted"]] += 1
            doc.p(f"{len(entry['correct'])} correct, {len(entry['wrong'])} wrong shown"
                  + (f" ({entry['note']})" if entry["note"] else "") + "."
                  + (" Wrong ones were taken for " + ", ".join(f"{c} ({n})" for c, n in wrong_as.items())
                     + f", with mean confidence {statistics.fmean(conf):.2f}." if conf else ""))
            doc.img(f"gradcam/{name}.png", f"Grad-CAM {name}")

    curves = OUT / "curves"
    write_csv(curves / "norms.csv", curve_rows(runs, base))
    write_csv(curves / "sanity.csv", curve_rows(runs, sanity))
    write_csv(curves / "batch.csv", curve_rows(runs, [r[2] for r in rows]))
    return doc


def main(argv: list[str]) -> None:
    p = load_params()
    doc = report(p)
    write_text(OUT / "report.md", doc.markdown())
    write_text(OUT / "report.html", doc.html(OUT))
    console.print(f"report: {OUT}/report.md and {OUT}/report.html")


if __name__ == "__main__":
    run_cli(main)
