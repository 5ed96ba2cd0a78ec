"""Reading prepared arrays: memory-mapped uint8 images, batched augmentation, seeded order.

No JPEG is decoded here. Each batch is a function of (seed, epoch, batch index)
only, so data order and augmentation are the same with 0 or 8 workers and after
a resume in the middle of a run.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import UserError, read_json

PREPARED = Path("data/prepared")
ARRAYS = "arrays.json"              # the arrays' digests and the train split's mean and std (prepare)


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
    try:
        x, y = np.load(xp, mmap_mode="r"), np.load(yp)
    except (ValueError, OSError, EOFError) as e:         # truncated, garbage, not an .npy
        raise UserError(f"{xp.parent}/{name}_*.npy: unreadable ({str(e).splitlines()[0][:120] or type(e).__name__}); "
                        "run `dvc repro -f prepare`") from None
    if x.ndim != 4 or x.shape[-1] != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{xp}: unexpected shape {x.shape} for {len(y)} labels; run `dvc repro prepare` again")
    return Split(name, x, y)


def load_classes(root: Path = PREPARED) -> list[str]:
    path = root / "classes.json"
    try:
        classes = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `dvc repro prepare` first") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e}); run `dvc repro -f prepare`") from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path}: not a list of class names; run `dvc repro -f prepare`")
    return classes


def load_train_stats(root: Path = PREPARED) -> tuple[list[float], list[float]]:
    """The train split's per-channel mean and std on the [0, 1] scale, which `prepare` computed once
    (`arrays.json`, `resnorm.prepare.describe_arrays`) so that no training run has to: at the birds
    set's size that took about 5 s of every run's start on 2 cores, 41 times a study."""
    path = root / ARRAYS
    try:
        stats = read_json(path).get("train")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run `dvc repro prepare` (data prepared by older code lacks it)") from None
    except (ValueError, AttributeError) as e:
        raise UserError(f"{path}: not valid ({e}); run `dvc repro -f prepare`") from None
    ok = isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == 3 and all(isinstance(v, float) for v in stats[k])
        for k in ("mean", "std"))
    if not ok or not all(v > 0 for v in stats["std"]):
        raise UserError(f"{path}: no per-channel mean and std of the train split; run `dvc repro -f prepare`")
    return stats["mean"], stats["std"]


def to_tensor(x, mean: list[float], std: list[float], device: torch.device | str = "cpu",
              channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC (array or tensor) -> normalized float32 NCHW on `device`."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    t = t.to(device, non_blocking=True).permute(0, 3, 1, 2)       # NCHW view of NHWC memory: channels_last
    m, s = _scale(tuple(mean), tuple(std), t.device)
    t = (t.float() - m) / s
    return t if channels_last else t.contiguous()


@functools.lru_cache(maxsize=8)
def _scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std times 255 as (1, 3, 1, 1) tensors on `device`, made once: building them at every
    step would be a blocking host-to-device copy, a wait for the GPU at every step."""
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    return m, s


def crop_flip(x: torch.Tensor, aug: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop after zero padding and horizontal flip of uint8 NHWC images, in one gather.

    `aug` holds per sample (dy, dx, flip). Done on the training device, so workers only
    ship uint8 and the GPU, not the CPU, does the per-pixel work.
    """
    n, h, w, _ = x.shape
    if padding:
        x = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    aug = aug.to(x.device, non_blocking=True)
    dy, dx, flip = aug[:, 0], aug[:, 1], aug[:, 2].bool()
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]                                     # (n, h)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w[None, :], ar_w[None, :])   # (n, w)
    b = torch.arange(n, device=x.device)[:, None, None]
    return x[b, rows[:, :, None], cols[:, None, :]]                       # (n, h, w, C)


def affine(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """NHWC images turned by params[:, 0] degrees (clockwise) and scaled by params[:, 1] about their
    centre, bilinear, black where nothing maps: torchvision's `affine` on float images (no translation or
    shear), every sample with its own matrix in one `grid_sample`. Returns float32 NHWC on the 0-255 scale."""
    n, h, w, _ = x.shape
    p = params.to(x.device, torch.float32)
    angle, scale = torch.deg2rad(p[:, 0]), p[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # the inverse map, output pixel -> input pixel about the centre ([[cos, sin], [-sin, cos]] / scale), each
    # row then divided by the half width or height: grid_sample's [-1, 1] (no tensor made from host numbers:
    # on a GPU that would be a copy the step waits for)
    theta = torch.stack([torch.stack([cos, sin], 1) / (0.5 * w), torch.stack([-sin, cos], 1) / (0.5 * h)], 1)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=x.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=x.device)
    pixels = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).view(1, h * w, 2)           # (x, y) per pixel
    grid = pixels.expand(n, -1, -1).bmm(theta.transpose(1, 2)).view(n, h, w, 2)
    images = x.permute(0, 3, 1, 2).float()
    out = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.permute(0, 2, 3, 1).contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of NHWC RGB images with torchvision's `rgb_to_grayscale` weights (ITU-R 601-2), (n, h, w, 1)."""
    return 0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of uint8 NHWC images scaled by per-sample factors (n, 3), in
    that order, as torchvision's `adjust_brightness`, `adjust_contrast` and `adjust_saturation` do on
    float images (its ColorJitter draws the order at random; this keeps one). Each step blends the
    image with black, its mean grey level or its grey version, and clips to the range. Returns float32
    NHWC on the 0-255 scale, which `to_tensor` normalizes as it does uint8."""
    f = factors.to(x.device, torch.float32)
    bright, contrast, saturation = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = (x.float() * bright).clamp(0, 255)
    x = (contrast * x + (1 - contrast) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp(0, 255)
    return (saturation * x + (1 - saturation) * _gray(x)).clamp(0, 255)


def cutout(x: torch.Tensor, centres: torch.Tensor, side: int) -> torch.Tensor:
    """Normalized NCHW images, each with a side x side square set to 0 (the train mean), its centre
    at the sample's (row, column) in `centres` and clipped at the border, so near an edge less is
    hidden (DeVries & Taylor 2017: the centre is any pixel)."""
    n, _, h, w = x.shape
    c = centres.to(x.device)
    first = c - side // 2                                                  # (n, 2): the square's first row and column
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= first[:, :1]) & (rows < first[:, :1] + side)         # (n, h)
    in_cols = (cols >= first[:, 1:]) & (cols < first[:, 1:] + side)         # (n, w)
    return x.clone().masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)   # x's memory layout


def batch_count(n: int, batch_size: int, training: bool = True) -> int:
    """Batches in one pass over n images. In training a last batch of one sample would break
    batch statistics, so it is folded away."""
    return n // batch_size + (1 if n % batch_size > (1 if training else 0) else 0)


class EpochBatches(torch.utils.data.Dataset):
    """The batches of one epoch; item i is batch i, fixed by (seed, epoch, i).

    An item is (uint8 NHWC images, labels, augmentation parameters or None): the cheap
    part (a sorted memory-mapped read) runs in workers, `to` does the rest on the
    training device.
    """

    def __init__(self, split: Split, batch_size: int, mean, std, *, shuffle: bool, seed: int = 0,
                 epoch: int = 0, augment: bool = False, padding: int = 0, hflip: bool = False,
                 cutout: int = 0, color_jitter: float = 0.0, rotate: float = 0.0, zoom: float = 0.0):
        self.split, self.batch_size, self.mean, self.std = split, batch_size, mean, std
        self.aug, self.padding, self.hflip, self.seed, self.epoch = augment, padding, hflip, seed, epoch
        self.cutout, self.color_jitter, self.rotate, self.zoom = cutout, color_jitter, rotate, zoom
        n = len(split)
        if shuffle:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self.order = torch.randperm(n, generator=g).numpy()
        else:
            self.order = np.arange(n)
        self.n_batches = batch_count(n, batch_size, shuffle)

    @classmethod
    def training(cls, split: Split, batch_size: int, mean, std, t, *, seed: int, epoch: int) -> "EpochBatches":
        """One epoch of training batches: shuffled, and augmented as the `train` settings `t` say."""
        return cls(split, batch_size, mean, std, shuffle=True, seed=seed, epoch=epoch, augment=t.augment,
                   padding=t.crop_padding, hflip=t.hflip, cutout=t.cutout, color_jitter=t.color_jitter,
                   rotate=t.rotate, zoom=t.zoom)

    def __len__(self) -> int:
        return self.n_batches

    def indices(self, i: int) -> np.ndarray:
        """The rows of batch i, sorted (sequential memory-mapped reads; the same rows in any path)."""
        return np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])

    def augmentation(self, i: int, n: int) -> dict[str, torch.Tensor] | None:
        """Batch i's per-sample parameters, a function of (seed, epoch, i) only; None without augmentation:
        "crop" (dy, dx, flip), and where they are on, "cutout" (the square's centre row and column),
        "jitter" (brightness, contrast and saturation factors) and "affine" (angle, scale). They are drawn
        in that order from one generator, so turning any of the others on leaves every crop and flip as it
        was."""
        if not self.aug:
            return None
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + i)
        offs = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
        flip = (torch.rand(n, generator=g) < 0.5) & self.hflip
        aug = {"crop": torch.cat([offs, flip.long()[:, None]], 1)}
        if self.cutout:
            h, w = self.split.x.shape[1:3]
            aug["cutout"] = torch.stack([torch.randint(0, h, (n,), generator=g),
                                         torch.randint(0, w, (n,), generator=g)], 1)
        if self.color_jitter:
            aug["jitter"] = 1 - self.color_jitter + 2 * self.color_jitter * torch.rand(n, 3, generator=g)
        if self.rotate or self.zoom:
            u = torch.rand(n, 2, generator=g) * 2 - 1                        # uniform in [-1, 1)
            aug["affine"] = torch.stack([self.rotate * u[:, 0], 1 + self.zoom * u[:, 1]], 1)
        return aug

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = self.indices(i)
        x = torch.from_numpy(np.ascontiguousarray(self.split.x[idx]))
        return x, torch.from_numpy(self.split.y[idx]), self.augmentation(i, len(idx))

    def resident_item(self, i: int, images: torch.Tensor, labels: torch.Tensor):
        """Batch i gathered from a copy of the whole split already on the training device (`on_device`):
        the same rows and augmentation as __getitem__, with no image read or transfer. The plain
        version of `resident_epoch`, which the tests hold it to."""
        idx = torch.from_numpy(self.indices(i)).to(images.device)
        return images[idx], labels[idx], self.augmentation(i, len(idx))

    def resident_epoch(self, images: torch.Tensor, labels: torch.Tensor):
        """Every batch of the epoch from a split on the device, as `resident_item` gives them.

        The epoch's rows and augmentation parameters go to the device in one copy each, at the
        start: a small host-to-device copy per step (from pageable memory) would make the CPU
        wait for the GPU at every step, which is what the loop avoids.
        """
        parts = [self.indices(i) for i in range(len(self))]
        sizes = [len(rows) for rows in parts]
        rows = torch.from_numpy(np.concatenate(parts))
        augs = [self.augmentation(i, n) for i, n in enumerate(sizes)]
        rows = rows.to(images.device)
        aug = {k: torch.cat([a[k] for a in augs]).to(images.device) for k in augs[0]} if self.aug and augs else None
        start = 0
        for n in sizes:
            idx = rows[start:start + n]
            yield images[idx], labels[idx], None if aug is None else {k: a[start:start + n] for k, a in aug.items()}
            start += n

    def to(self, batch, device: torch.device | str = "cpu", channels_last: bool = False):
        """A batch from __getitem__ -> (normalized float images, labels) on `device`, augmented as its
        parameters say: crop and flip, rotation and zoom, colour jitter, normalization, then cutout
        (DeVries & Taylor cut out of the normalized image, so the square is the mean, not black)."""
        x, y, aug = batch
        x = x.to(device, non_blocking=True)
        if aug is not None:                 # every kind's parameters in one non-blocking copy each (from pinned
            aug = {k: a.to(device, non_blocking=True) for k, a in aug.items()}    # memory): no wait per step
            x = crop_flip(x, aug["crop"], self.padding)
            if "affine" in aug:
                x = affine(x, aug["affine"])
            if "jitter" in aug:
                x = color_jitter(x, aug["jitter"])
        x = to_tensor(x, self.mean, self.std, device, channels_last)
        if aug is not None and "cutout" in aug:
            x = cutout(x, aug["cutout"], self.cutout)
        return x, y.to(device, non_blocking=True)


def on_device(split: Split, device: torch.device, share: float = 0.25) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The whole uint8 split and its labels on a CUDA device, when they take at most `share` of its
    free memory (30,000 images at 256 px are 5.9 GB); None on CPU (the memory map is already there)
    or when the split does not fit."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if split.x.nbytes > share * free:
        return None
    images = torch.empty(split.x.shape, dtype=torch.uint8, device=device)
    for i in range(0, len(split), 4096):                       # in chunks: host memory stays flat
        images[i:i + 4096] = torch.from_numpy(np.ascontiguousarray(split.x[i:i + 4096])).to(device)
    return images, torch.from_numpy(np.asarray(split.y)).to(device)


def batches(ds: EpochBatches, workers: int = 0, pin_memory: bool = False,
            resident: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Iterate the batches of an epoch: from a split already on the device (`resident`, see
    `on_device`), in worker processes when `workers` > 0, or in this process."""
    if resident is not None:
        yield from ds.resident_epoch(*resident)
        return
    if workers == 0:
        for i in range(len(ds)):
            yield ds[i]
        return
    yield from torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                           pin_memory=pin_memory)
