"""Reading prepared arrays: memory-mapped uint8 images, batched augmentation, seeded order.

No JPEG is decoded here. Each batch is a function of (seed, epoch, batch index)
only, so data order and augmentation are the same with 0 or 8 workers and after
a resume in the middle of a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import UserError, read_json

PREPARED = Path("data/prepared")


@dataclass
class Split:
    """One split: memory-mapped (N, S, S, 3) uint8 images and int64 labels."""
    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_split(name: str, root: Path = PREPARED) -> Split:
    xp, yp = root / f"{name}_x.npy", root / f"{name}_y.npy"
    if not xp.exists() or not yp.exists():
        raise UserError(f"{xp}: prepared data not found; run `dvc repro prepare` first")
    x, y = np.load(xp, mmap_mode="r"), np.load(yp)
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
        raise UserError(f"{xp}: unexpected shape {x.shape} for {len(y)} labels; run `dvc repro prepare` again")
    return Split(name, x, y)


def load_classes(root: Path = PREPARED) -> list[str]:
    return read_json(root / "classes.json")


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1], streamed in chunks (flat memory)."""
    total = np.zeros(3)
    sq = np.zeros(3)
    count = 0
    for i in range(0, len(x), chunk):
        a = np.asarray(x[i:i + chunk], dtype=np.float64) / 255.0
        total += a.sum(axis=(0, 1, 2))
        sq += (a * a).sum(axis=(0, 1, 2))
        count += a.shape[0] * a.shape[1] * a.shape[2]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(sq / max(count, 1) - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


def to_tensor(x: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NHWC -> normalized float32 NCHW."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return t.sub_(m).div_(s)


def augment(x: torch.Tensor, gen: torch.Generator, padding: int, hflip: bool) -> torch.Tensor:
    """Random crop after zero padding, and a random horizontal flip, per sample."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        offs = torch.randint(0, 2 * padding + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offs)])
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


class EpochBatches(torch.utils.data.Dataset):
    """The batches of one epoch; item i is batch i, fixed by (seed, epoch, i)."""

    def __init__(self, split: Split, batch_size: int, mean, std, *, shuffle: bool, seed: int = 0,
                 epoch: int = 0, augment: bool = False, padding: int = 0, hflip: bool = False):
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.aug, self.padding, self.hflip, self.seed, self.epoch = augment, padding, hflip, seed, epoch
        n = len(split)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self.order = torch.randperm(n, generator=g).numpy()
        else:
            self.order = np.arange(n)
        # a last batch of one sample would break batch statistics in training: fold it away
        self.n_batches = n // batch_size + (1 if n % batch_size > (1 if shuffle else 0) else 0)

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted: sequential mmap reads
        x = to_tensor(self.split.x[idx], self.mean, self.std)
        y = torch.from_numpy(self.split.y[idx])
        if self.aug:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + i)
            x = augment(x, g, self.padding, self.hflip)
        return x, y


def batches(ds: EpochBatches, workers: int = 0, pin_memory: bool = False, start: int = 0):
    """Iterate batches `start`.. of an epoch, in worker processes when `workers` > 0."""
    if workers == 0:
        for i in range(start, len(ds)):
            yield ds[i]
        return
    sub = torch.utils.data.Subset(ds, range(start, len(ds)))
    yield from torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=workers,
                                           pin_memory=pin_memory)
