"""Sample I/O in the ADM evaluator's format, plus a PNG grid writer.

A samples file is an ``.npz`` whose ``arr_0`` is uint8 [N, H, W, C] (C = 3, or 1 for grey datasets), the format
OpenAI's guided-diffusion ``evaluations/evaluator.py`` reads, so our numbers can be cross-checked with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bidm.errors import BidmError
from bidm.fileio import atomic_write


def images_to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float images in [-1, 1], NCHW -> uint8 NHWC, rounding to nearest (exact inverse of x / 127.5 - 1)."""
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim != 4:
        raise BidmError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def uint8_to_images(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _check_uint8_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise BidmError(
            f"{where}: expected uint8 images [N, H, W, 1|3] (ADM .npz format), got {images.dtype} {images.shape}; "
            "convert float [-1, 1] NCHW tensors with bidm.npz_io.images_to_uint8"
        )
    return images


def save_samples_npz(path: str | Path, images: np.ndarray, **extra: np.ndarray) -> Path:
    """Write uint8 NHWC ``images`` as ``arr_0`` (plus any ``extra`` arrays, e.g. labels) atomically."""
    images = _check_uint8_nhwc(images, str(path))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to the temp name
            np.savez(fh, arr_0=images, **extra)

    return atomic_write(Path(path), write)


def load_samples_npz(path: str | Path, n: int | None = None, key: str = "arr_0") -> np.ndarray:
    """Read ``arr_0`` (uint8 NHWC) from an ADM-style ``.npz``; ``n`` keeps the first n images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise BidmError(f"{path} has no {key!r} array (keys: {sorted(z.files)}); expected ADM-style samples")
            images = z[key]
    except (OSError, ValueError) as err:
        raise BidmError(f"cannot read {path} as .npz: {err}") from err
    images = _check_uint8_nhwc(images, str(path))
    if n is not None:
        if n > len(images):
            raise BidmError(f"asked for {n} samples but {path} holds only {len(images)}")
        images = images[:n]
    return images


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, scale: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 NHWC images into one uint8 HWC array, ``nrow`` images per row, upscaled ``scale`` x (nearest)."""
    images = _check_uint8_nhwc(images, "make_grid")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


MIN_CELL = 64  # pixels: small images are upscaled (nearest) to at least this, so a grid of 16x16 samples is readable


def readable_scale(size: int, min_cell: int = MIN_CELL) -> int:
    """Nearest-neighbour factor that brings a ``size``-pixel image to at least ``min_cell`` pixels (1 if it is)."""
    return max(1, -(-min_cell // max(size, 1)))


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8, scale: int | None = None) -> Path:
    """Save uint8 NHWC images as one PNG grid (``nrow`` images per row); ``scale`` None upscales small images to
    `MIN_CELL` pixels (nearest neighbour), so every cell can be seen."""
    from PIL import Image

    images = _check_uint8_nhwc(images, "save_grid")
    scale = readable_scale(images.shape[1]) if scale is None else scale
    grid = make_grid(images, nrow=nrow, scale=scale)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
