"""Stage `evaluate`: the best checkpoint (by validation accuracy) on train, val and test.

Each split is scored as validation was scored in training: the run's precision (bf16 autocast
on a GPU), memory layout and batch size, so the val figures are those that chose the best epoch.

Writes, for one run (its wall time goes to logs/stage_times.tsv, like every stage's):
  metrics/<run>.json          accuracy, micro-F1, macro-F1, loss per split, the epoch chosen
                              (bit-identical for the same params and seed on the same CPU);
                              where prepare lists val or test images with a near-duplicate in
                              train, also each such split scored without them
  metrics/summary/experiment.json   (the experiment only) its declared DVC metrics, short keys
  plots/<run>/confusion.csv   test (actual, predicted) pairs, a DVC confusion plot
  plots/<run>/per_class.csv   per-class precision / recall / F1 / support on test
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .data import PREPARED, Split, load_classes, load_split
from .io import UserError, console, read_json, run_cli, write_csv, write_json
from .metrics import per_class, predict, scores
from .params import Params, TrainParams, Variant, load_params
from .model import model_from_config
from .train import autocast_for, eval_batch_size, load_checkpoint, parse_run, pick_device, run_paths, select

SPLITS = ("train", "val", "test")
EXPERIMENT_SUMMARY = Path("metrics/summary/experiment.json")


def confusion_rows(actual, predicted, classes: list[str]) -> list[dict]:
    """The confusion matrix as one row per (actual, predicted) pair of classes, zeros included, so
    the plot is square over every class (a class never predicted keeps its column)."""
    counts = [[0] * len(classes) for _ in classes]
    for a, b in zip(actual, predicted):
        counts[int(a)][int(b)] += 1
    return [{"actual": classes[a], "predicted": classes[b], "count": counts[a][b]}
            for a in range(len(classes)) for b in range(len(classes))]


def summary(metrics: dict) -> dict:
    """The experiment's declared DVC metrics: val / test accuracy and macro-F1, train accuracy and
    the epoch chosen, under short keys and with numbers only (the full record is the run's file)."""
    out = {s: {"acc": metrics[s]["accuracy"], "f1": metrics[s]["macro_f1"]}
           for s in ("val", "test") if metrics.get(s)}
    if metrics.get("train"):
        out["train"] = {"acc": metrics["train"]["accuracy"]}
    out["best_epoch"] = metrics["best_epoch"]
    return out


def near_train_rows(prepared: Path = PREPARED) -> dict[str, list[int]]:
    """Per split, the rows of its arrays whose image has a near-duplicate in train (prepare's
    `near_duplicates_of_train`, each with its `row`: given split folders can hold such photos); {}
    where there are none."""
    path = prepared / "report.json"
    near = read_json(path).get("near_duplicates_of_train", [])
    if any(not isinstance(r.get("row"), int) for r in near):
        raise UserError(f"{path}: near-duplicates without their rows (older prepare code); run `dvc repro prepare`")
    rows: dict[str, list[int]] = defaultdict(list)
    for r in near:
        rows[r["split"]].append(r["row"])
    return {split: sorted(found) for split, found in rows.items()}


def without_rows(y: np.ndarray, pred: np.ndarray, rows: list[int], num_classes: int) -> dict:
    """Accuracy and macro-F1 of a split scored without `rows` (its near-duplicates of train), and the
    accuracy on those rows themselves, so the report can say how much those images move its score."""
    keep = np.ones(len(y), dtype=bool)
    keep[rows] = False
    s = scores(y[keep], pred[keep], num_classes)
    return {"images": int(keep.sum()), "excluded": len(rows), "accuracy": round(s["accuracy"], 6),
            "macro_f1": round(s["macro_f1"], 6),
            "excluded_accuracy": round(float(np.mean(y[~keep] == pred[~keep])), 6)}


def scoring_model(checkpoint: dict, t: TrainParams) -> tuple[torch.nn.Module, torch.device]:
    """A checkpoint's model in eval mode on its run's device (`train.device`) and memory layout; the
    process then uses the run's CPU threads (`train.threads`) too, as training did."""
    device = pick_device(t.device)
    torch.set_num_threads(t.threads)
    model = model_from_config(checkpoint["model_config"]).to(device)
    model.load_state_dict(checkpoint["model"])
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), device


def predict_as_validated(model: torch.nn.Module, device: torch.device, split: Split, checkpoint: dict, v: Variant):
    """`predict` as validation ran in training (the run's precision, memory layout and batch size), so
    the val figures repeat those that chose the best epoch and Grad-CAM's right and wrong are evaluate's."""
    return predict(model, split, checkpoint["mean"], checkpoint["std"], eval_batch_size(v.batch_size), device,
                   autocast_for(v.train, device), v.train.channels_last)


def evaluate(p: Params, variant: str | None = None, seed: int | None = None) -> dict:
    v = select(p, variant)
    seed = p.seed if seed is None else seed
    paths = run_paths(variant, seed)
    if not paths.last.exists():
        raise UserError(f"{paths.last}: no checkpoint; run the train stage first")
    last = load_checkpoint(paths.last)
    metrics = {"run": paths.name, "variant": v.name, "norm": v.norm, "batch_size": v.batch_size, "seed": seed,
               "status": last["status"], "epochs_trained": last["epoch"], "best_epoch": last["best_epoch"],
               "engine": last.get("engine"), "model": last.get("model_config")}
    if last.get("transfer"):
        metrics["transfer"] = last["transfer"]
    classes = load_classes()
    confusion, table = [], []
    if last["status"] != "diverged" and last["best_epoch"] and not paths.best.exists():
        raise UserError(f"{paths.best}: missing, though {paths.last} says the run {last['status']} (best epoch "
                        f"{last['best_epoch']}); run `dvc repro` (training retrains it) or restore the file")
    if last["status"] == "diverged" or not paths.best.exists():
        metrics["message"] = last["message"] or "no checkpoint with a finite validation loss"
        metrics["status"] = "diverged"
        console.print(f"[red]{paths.name}: diverged[/red] ({metrics['message']}); no scores written")
    else:
        best = load_checkpoint(paths.best)
        model, device = scoring_model(best, v.train)
        near, without = near_train_rows(), {}
        for split in SPLITS:
            data = load_split(split)
            if len(data) == 0:
                metrics[split] = None
                continue
            loss, pred, _ = predict_as_validated(model, device, data, best, v)
            s = scores(data.y, pred, len(classes))
            metrics[split] = {k: round(x, 6) for k, x in {**s, "loss": loss}.items()}
            if near.get(split):
                without[split] = without_rows(data.y, pred, near[split], len(classes))
            if split == "test":
                confusion = confusion_rows(data.y, pred, classes)
                table = per_class(data.y, pred, classes)
        if without:                   # only where prepare listed any: a data set without them scores as before
            metrics["without_near_train"] = without
    write_json(paths.metrics, metrics)
    if variant is None:
        write_json(EXPERIMENT_SUMMARY, summary(metrics))
    write_csv(paths.plots / "confusion.csv", confusion, ["actual", "predicted", "count"])
    write_csv(paths.plots / "per_class.csv", table, ["class", "precision", "recall", "f1", "support"])
    if metrics.get("val"):
        console.print(f"{paths.name}: " + "  ".join(
            f"{s} acc {metrics[s]['accuracy']:.3f} macro-F1 {metrics[s]['macro_f1']:.3f}"
            for s in SPLITS if metrics.get(s)))
    return metrics


def main(argv: list[str]) -> None:
    args = parse_run(argv, "evaluate")
    evaluate(load_params(), args.variant, args.seed)


if __name__ == "__main__":
    run_cli(main)
