"""Streamed training data for datasets too big for RAM (LSUN-Bedrooms: 3 M images): a map-style dataset read
item by item, batched through a DataLoader with worker processes in the trainer's seeded order.

The batch of step k is ``dataset[order.indices(k)]`` (`bidm.train.BatchOrder`: epoch e's permutation comes from
(seed, e)), whatever the workers, their timing, or where the run was interrupted: a run resumed at step k reads
exactly the batches k, k + 1, ... an uninterrupted run reads (`StepBatchSampler` starts at k; the DataLoader keeps
the sampler's order).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bidm.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(path: str | Path | None) -> list[Path]:
    """Every image file under ``path``, recursively, in sorted order."""
    if not path or not Path(path).is_dir():
        raise DataError(f"folder dataset needs data.path to be an image directory, got {path!r}")
    files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return files


def load_image(file: Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the largest centered square, resized with bicubic filtering (LDM's LSUN loader)."""
    from PIL import Image

    try:
        img = Image.open(file).convert("RGB")
    except OSError as err:
        raise DataError(f"cannot read image {file}: {err}") from None
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    return np.array(img)  # a writable copy (torch.from_numpy warns on a read-only PIL buffer)


class ImageFolder(Dataset):
    """Images of a folder as float [3, size, size] in [-1, 1], read when indexed. ``limit`` keeps a seeded random
    subset of that many files (the same rule as the in-RAM datasets' ``data.limit``)."""

    def __init__(self, path: str | Path, size: int, *, limit: int | None = None, seed: int = 0):
        files = list_images(path)
        if limit:
            g = torch.Generator().manual_seed(seed)
            files = [files[i] for i in torch.randperm(len(files), generator=g)[:limit].tolist()]
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(load_image(self.files[i], self.size)).permute(2, 0, 1).float()
        return x / 127.5 - 1.0


class StepBatchSampler(Sampler):
    """Yields the (rank's share of the) index batch of each step ``start, ..., stop - 1`` from ``order``."""

    def __init__(self, order, start: int, stop: int, rank: int = 0, world: int = 1):
        self.order, self.start, self.stop, self.rank, self.world = order, start, stop, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield self.order.indices(step)[self.rank :: self.world].tolist()


def stream_batches(
    dataset: Dataset, order, start: int, stop: int, *, rank: int = 0, world: int = 1, workers: int = 0
) -> Iterator[torch.Tensor]:
    """The batches of steps ``start .. stop - 1`` of ``dataset`` in ``order``, loaded by ``workers`` processes."""
    loader = DataLoader(
        dataset,
        batch_sampler=StepBatchSampler(order, start, stop, rank, world),
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def tensor_batches(images: torch.Tensor, order, start: int, stop: int, *, rank: int = 0, world: int = 1):
    """The same order over an in-RAM tensor."""
    for step in range(start, stop):
        yield images[order.indices(step)[rank::world]]
