"""Stage `sanity`: direct evidence that the from-scratch BN is nn.BatchNorm2d.

The assignment's sanity check compares the curves of the Section 1.1 model (PyTorch's
BatchNorm2d) with the from-scratch BN variant: they "should be identical (almost)". In
float32 the two drift apart over thousands of steps through rounding alone, so curves
only show "close". This stage shows the direct version: both models from one
initialisation, on the same batches (the real training data, order and augmentation),
with the same optimizer, stepped together in float64 for `sanity.steps` steps. It writes
the largest loss, logit and parameter differences (metrics/sanity.json): at float64
rounding they say the two layers compute the same function and gradients.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .data import EpochBatches, load_classes, load_split, load_train_stats
from .io import console, no_options, run_cli, write_json
from .params import Params, load_params
from .train import make_model, make_optimizer, pick_device

OUT = "metrics/sanity.json"


def lockstep(p: Params, steps: int) -> dict:
    """Train BN and torch_bn side by side in float64 from one init on the same batches."""
    t = p.train
    torch.set_num_threads(t.threads)
    device = pick_device(t.device)          # the training device: float64 on a GPU takes seconds, on a CPU minutes at 256 px
    classes, split = load_classes(), load_split("train")
    mean, std = load_train_stats()
    torch.manual_seed(p.seed)
    m = dataclasses.replace(p.model, dropout=0.0)     # one init, no random masks: the two nets see the same sums
    ours = make_model(m, "bn", len(classes)).double().to(device)
    ref = make_model(m, "torch_bn", len(classes)).double().to(device)
    ref.load_state_dict(ours.state_dict())            # same keys: weight, bias, running stats per norm
    models = (ours, ref)
    lr = p.experiment().lr                            # the experiment's batch size and scaled rate
    opts = [make_optimizer(m, t, lr) for m in models]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    worst = {"loss": 0.0, "logits": 0.0, "parameters": 0.0, "running_stats": 0.0}
    losses, step, epoch = [], 0, 0
    while step < steps:
        ds = EpochBatches.training(split, p.batch_size, mean, std, t, seed=p.seed, epoch=epoch)
        for i in range(len(ds)):
            if step == steps:
                break
            x, y = ds.to(ds[i], device)
            x = x.double()
            out = []
            for m, opt in zip(models, opts):
                m.train()
                logits = m(x)
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                out.append((logits.detach(), loss.item()))
            worst["loss"] = max(worst["loss"], abs(out[0][1] - out[1][1]))
            worst["logits"] = max(worst["logits"], float((out[0][0] - out[1][0]).abs().max()))
            worst["parameters"] = max(worst["parameters"], _max_diff(ours.named_parameters(), ref.named_parameters()))
            worst["running_stats"] = max(worst["running_stats"], _max_diff(
                ((k, b) for k, b in ours.named_buffers() if b.is_floating_point()),
                ((k, b) for k, b in ref.named_buffers() if b.is_floating_point())))
            losses.append(out[1][1])
            step += 1
        epoch += 1
    scale = max(max(q.detach().abs().max().item() for q in ref.parameters()), 1e-300)
    return {"steps": steps, "dtype": "float64", "device": device.type, "batch_size": p.batch_size, "lr": lr,
            "first_loss": round(losses[0], 6), "last_loss": round(losses[-1], 6),
            "max_loss_difference": float(f"{worst['loss']:.3e}"),
            "max_logit_difference": float(f"{worst['logits']:.3e}"),
            "max_parameter_difference": float(f"{worst['parameters']:.3e}"),
            "max_running_stat_difference": float(f"{worst['running_stats']:.3e}"),
            "largest_parameter": round(scale, 6)}


def _max_diff(a, b) -> float:
    a, b = dict(a), dict(b)
    if a.keys() != b.keys():
        raise RuntimeError(f"sanity: the two models' tensors differ: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def main(argv: list[str]) -> None:
    no_options(argv, "sanity", __doc__, "sanity.*, model.* and train.*")
    p = load_params()
    result = lockstep(p, p.sanity.steps)
    write_json(OUT, result)
    console.print(f"sanity: {result['steps']} float64 SGD steps of BN vs nn.BatchNorm2d from one init: largest "
                  f"loss difference {result['max_loss_difference']:.1e}, parameter difference "
                  f"{result['max_parameter_difference']:.1e} (loss {result['first_loss']:.3f} -> {result['last_loss']:.3f})")


if __name__ == "__main__":
    run_cli(main)
