"""Content hashes of bidm's safetensors files (checkpoints and packed exports).

`digest` is a sha256 over every tensor (name, dtype, shape, bytes, in sorted name order) and every other metadata
field, stored in the metadata as ``sha256`` when the file is written and checked when it is read: a flipped bit in
the weights or in the stored config is an error instead of a silently different model. Files written before the
hash existed still load, with a warning. ``BIDM_NO_VERIFY=1`` (or ``bidm --no-verify``) skips the check, e.g. to
rescue what is left of a damaged file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings

import torch

from bidm.errors import CheckpointError

HASH_KEY = "sha256"
ENV_SKIP = "BIDM_NO_VERIFY"
_skip_override: bool | None = None


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 hex digest of the tensors and of every metadata field but ``sha256`` itself."""
    h = hashlib.sha256()
    fields = {k: v for k, v in meta.items() if k != HASH_KEY}
    h.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def with_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """``meta`` plus its ``sha256`` field, for writing."""
    return {**meta, HASH_KEY: digest(tensors, meta)}


def verification_enabled() -> bool:
    if _skip_override is not None:
        return not _skip_override
    return os.environ.get(ENV_SKIP, "").strip().lower() in ("", "0", "false", "no")


@contextlib.contextmanager
def skip_verification(skip: bool = True):
    """Inside the block, loads do (``skip=False``) or do not (``skip=True``) check hashes, whatever the env says."""
    global _skip_override
    before, _skip_override = _skip_override, skip
    try:
        yield
    finally:
        _skip_override = before


def verify(path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Raise `CheckpointError` when the stored hash does not match; warn when the file has none."""
    if not verification_enabled():
        return
    stored = meta.get(HASH_KEY)
    if stored is None:
        warnings.warn(
            f"{path} has no content hash (written by an older bidm): its integrity cannot be checked",
            stacklevel=3,
        )
        return
    if digest(tensors, meta) != stored:
        raise CheckpointError(
            f"{path} failed its integrity check: the content no longer matches the sha256 stored when it was "
            f"written (corrupt or modified file); use bidm --no-verify (or {ENV_SKIP}=1) to load it anyway"
        )
