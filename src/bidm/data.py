"""Datasets: one builder per dataset, each returning (images float32 NCHW in [-1, 1], labels int64 or None).

``digits``   scikit-learn's bundled 8x8 handwritten digits (1797 images, offline), resized; the built-in default.
``cifar10``  the official python-pickle directory (``cifar-10-batches-py``, read by `read_cifar_batch`, which runs
             no pickled code) or an ``.npz`` with ``images`` uint8 [N,32,32,3] and ``labels`` (the format of
             shared/data/cifar10), optionally resized (16 for CPU runs).
``npz``      any ``.npz`` of uint8 ``images`` [N,H,W,C] (C = 1 or 3; optional ``labels``): a file, or a directory
             holding ``{split}.npz``; optionally resized. The same benchmark protocol runs on any such dataset.
``folder``   any image folder (LSUN/FFHQ style), center-cropped and resized.
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bidm.diffusion import resize
from bidm.errors import DataError
from bidm.npz_io import uint8_to_images

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _uint8_nhwc_to_tensor(images: np.ndarray, size: int | None) -> torch.Tensor:
    x = uint8_to_images(images)
    return resize(x, size).clamp(-1, 1) if size else x


def load_digits(size: int = 16, channels: int = 1, **_) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn digits (values 0..16) scaled to [-1, 1] and resized bilinearly to size x size."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images).float()[:, None] / 8.0 - 1.0  # [1797, 1, 8, 8]
    x = resize(x, size).clamp(-1, 1)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif channels != 1:
        raise DataError(f"digits supports channels 1 or 3, got {channels}")
    return x, torch.from_numpy(bunch.target).long()


def _numpy_global(module: str, name: str):
    """``numpy._core.<module>.<name>`` (numpy 2) or ``numpy.core.<module>.<name>`` (numpy 1), without the
    deprecated ``numpy.core`` shim."""
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


class CifarUnpickler(pickle.Unpickler):
    """A pickle reader that can rebuild only what the official CIFAR-10 python batches hold: a dict of str/bytes
    keys, lists of ints and bytes, and uint8 numpy arrays. Every other global a pickle names (``os.system``,
    ``builtins.eval``, any class) is refused before it is looked up, so a crafted batch cannot run code."""

    NUMPY = {("multiarray", "_reconstruct"), ("numeric", "_frombuffer")}  # array rebuilders of protocols 2-5
    BUILTINS = {"dict", "list", "str", "bytes", "int", "tuple", "bytearray"}

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric") and (module.rsplit(".", 1)[1], name) in self.NUMPY:  # fmt: skip
            return _numpy_global(module.rsplit(".", 1)[1], name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("builtins", "__builtin__") and name in self.BUILTINS:
            return getattr(__import__("builtins"), name)
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,32,32,3], int64 labels [N]) from one official CIFAR-10 python batch, via `CifarUnpickler`;
    anything else (other globals, object arrays, missing keys, wrong shapes) is a `DataError`."""
    try:
        with open(file, "rb") as fh:
            batch = CifarUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DataError(f"{file} is not an official CIFAR-10 python batch: {err}") from None
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DataError(f"{file} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels'")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{file}: 'data' must be a uint8 array [N, 3072], got {getattr(data, 'dtype', type(data))}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(isinstance(v, int) for v in labels):
        raise DataError(f"{file}: 'labels' must be a list of {len(data)} integers")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _read_cifar_pickles(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = directory / name
        if not file.is_file():
            raise DataError(f"CIFAR-10 batch {file} missing; expected the extracted cifar-10-batches-py directory")
        x, y = read_cifar_batch(file)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def _read_npz(file: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(file, allow_pickle=False) as z:
            key = "images" if "images" in z else "arr_0" if "arr_0" in z else None
            if key is None:
                raise DataError(f"{file} has no 'images' (or 'arr_0') array; keys: {sorted(z.files)}")
            images = z[key]
            labels = z["labels"].astype(np.int64) if "labels" in z else None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {file} as .npz: {err}") from err
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{file}: expected uint8 images [N,H,W,C] with C = 1 or 3, got {images.dtype} {images.shape}")
    return images, labels


def load_cifar10(path: str | None = None, split: str = "train", size: int | None = None, **_):
    """CIFAR-10 from ``path``: a directory holding ``{split}.npz`` or ``cifar-10-batches-py``, or a file."""
    if not path:
        raise DataError(
            "cifar10 needs data.path: a .npz with uint8 'images' [N,32,32,3] + 'labels', a directory with "
            "train.npz/test.npz, or the extracted cifar-10-batches-py directory (`bidm.data.download_cifar10(DIR)`)"
        )
    p = Path(path)
    if p.is_file():
        images, labels = _read_npz(p)
    elif (p / f"{split}.npz").is_file():
        images, labels = _read_npz(p / f"{split}.npz")
    elif (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
        images, labels = _read_cifar_pickles(p, split)
    elif (p / "cifar-10-batches-py").is_dir():
        images, labels = _read_cifar_pickles(p / "cifar-10-batches-py", split)
    else:
        raise DataError(f"no CIFAR-10 data at {p}: expected {split}.npz, a .npz file or cifar-10-batches-py/")
    y = torch.from_numpy(labels) if labels is not None else None
    return _uint8_nhwc_to_tensor(images, size), y


def load_npz(path: str | None = None, split: str = "train", size: int | None = None, **_):
    """uint8 images from ``path``: a ``.npz`` file, or a directory holding ``{split}.npz``."""
    if not path:
        raise DataError("npz needs data.path: a .npz with uint8 'images' [N,H,W,C], or a directory with {split}.npz")
    p = Path(path)
    file = p if p.is_file() else p / f"{split}.npz"
    if not file.is_file():
        raise DataError(f"no .npz at {p}: expected a .npz file or a directory holding {split}.npz")
    images, labels = _read_npz(file)
    y = torch.from_numpy(labels) if labels is not None else None
    return _uint8_nhwc_to_tensor(images, size), y


def load_folder(path: str | None = None, size: int = 64, limit: int | None = None, **_):
    """Every image under ``path`` (recursively, sorted), center-cropped to a square and resized to ``size``, in
    RAM (``data.stream=true`` reads them lazily instead: `bidm.stream.ImageFolder`)."""
    from bidm.stream import list_images, load_image

    files = list_images(path)
    files = files[:limit] if limit else files
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = load_image(f, size)
    return _uint8_nhwc_to_tensor(out, None), None


DATASETS = {"digits": load_digits, "cifar10": load_cifar10, "npz": load_npz, "folder": load_folder}


def load_dataset(name: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images float32 [N, C, H, W] in [-1, 1] and labels (or None). Keyword args go to the builder."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)


def download_cifar10(directory: str | Path) -> Path:
    """Fetch and extract the official python archive (machines with internet only; never used by tests)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "cifar-10-python.tar.gz"
    if not archive.exists():
        urllib.request.urlretrieve(CIFAR10_URL, archive)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    return directory / "cifar-10-batches-py"


def load_training_images(cfg):
    """The training images of ``cfg.data`` (float [-1, 1] NCHW), shuffled by a seed and cut to ``data.limit``; with
    ``data.stream`` (folder only) a `bidm.stream.ImageFolder` dataset that reads them when indexed."""
    d = cfg.data
    if d.stream:
        if d.name != "folder":
            raise DataError(f"data.stream reads image folders only (data.name=folder), got data.name={d.name!r}")
        from bidm.stream import ImageFolder

        return ImageFolder(d.path, d.size, limit=d.limit, seed=cfg.train.seed)
    images, _ = load_dataset(d.name, path=d.path, split=d.split, size=d.size, channels=d.channels)
    if d.limit:
        g = torch.Generator().manual_seed(cfg.train.seed)
        images = images[torch.randperm(len(images), generator=g)[: d.limit]]
    return images
