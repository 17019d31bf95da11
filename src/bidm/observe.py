"""Forward-pass statistics behind the paper's observations, measured on real DDIM trajectories (`bidm analyze`).

Paper: Zheng et al., "BiDM", NeurIPS 2024, §3.2 Observation 1 (activation ranges change with t; neighbouring
steps have similar features) and §3.3 Observation 2 (SPD aligns binary features better than plain L2).

Pure functions of tensors:
    `percentiles`, `range_stats`  -- min / max / 1st / 99th percentile of one tensor (numpy's linear rule)
    `cosine_matrix`               -- step x step cosine similarity of one block's outputs [S, S]
    `lag_similarity`, `default_lags` -- mean similarity between sampler steps i and i + k
    `range_variation`             -- how much a layer's activation range moves across t (max / min of p99 - p1)

Recorders (forward hooks, removed afterwards; the model is not changed):
    `record_trajectory`  -- one model's own trajectory: input ranges of chosen layers and block outputs per step
    `feature_distances`  -- student vs teacher on the teacher's trajectory: per block and step, L2 and SPD
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.diffusion import as_denoiser, ddim_sample
from bidm.distill import FeatureTaps, l2_feature_loss, spd_loss
from bidm.tbs import CrossTimestep

RANGE_KEYS = ("min", "p01", "p99", "max")

# ---------------------------------------------------------------------------------------------- pure statistics


def percentiles(x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Percentiles (qs in [0, 1]) of all elements of ``x`` with linear interpolation (numpy's default rule).

    Sorting instead of torch.quantile, which refuses tensors of more than 2**24 elements.
    """
    v = x.detach().flatten().float().sort().values
    pos = torch.tensor(qs, dtype=torch.float64) * (v.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).float()
    return (v[lo] + (v[hi] - v[lo]) * frac).tolist()


def range_stats(x: torch.Tensor) -> dict[str, float]:
    """{"min", "p01", "p99", "max"} of every element of ``x`` (a whole batch)."""
    lo, p01, p99, hi = percentiles(x, (0.0, 0.01, 0.99, 1.0))
    return {"min": lo, "p01": p01, "p99": p99, "max": hi}


def range_variation(p01: list[float], p99: list[float]) -> float:
    """max_t (p99 - p01) / min_t (p99 - p01): 1 = the same range at every step; inf if a step's range is 0."""
    widths = [hi - lo for lo, hi in zip(p01, p99)]
    return max(widths) / min(widths) if min(widths) > 0 else float("inf")


def cosine_matrix(feats: torch.Tensor) -> torch.Tensor:
    """[S, S] cosine similarity between steps, per sample then averaged over the batch.

    ``feats`` [S, n, D]: one block's flattened outputs of n samples at S steps. An all-zero output has similarity
    0 to everything (F.normalize leaves it 0).
    """
    f = F.normalize(feats.double(), dim=-1)  # [S, n, D]
    return torch.einsum("ind,jnd->ij", f, f) / feats.shape[1]


def default_lags(steps: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... below ``steps``."""
    lags, k = [], 1
    while k < steps:
        lags += [lag for lag in (k, 2 * k, 5 * k) if lag < steps]
        k *= 10
    return lags


def lag_similarity(matrix: torch.Tensor, lags: list[int]) -> dict[int, float]:
    """Mean of matrix[i, i + k] over i (the k-th diagonal) for every k in ``lags`` shorter than the trajectory."""
    return {k: float(torch.diagonal(matrix, offset=k).mean()) for k in lags if k < matrix.shape[0]}


# ---------------------------------------------------------------------------------------------- recorders


def inner_unet(model: nn.Module) -> nn.Module:
    """The module that ``feature_blocks()`` and layer names are relative to: the UNet inside a TBS wrapper."""
    return model.unet if isinstance(model, CrossTimestep) else model


class InputRanges:
    """Records `range_stats` of the first input of named sub-modules at every call (forward pre-hooks)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.rows: dict[str, list[dict]] = {name: [] for name in names}
        self.shapes: dict[str, list[int]] = {}
        self._handles = [
            model.get_submodule(name).register_forward_pre_hook(partial(self._hook, name)) for name in names
        ]

    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        self.rows[name].append(range_stats(args[0]))
        self.shapes[name] = list(args[0].shape[1:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@torch.no_grad()
def record_trajectory(
    model: nn.Module,
    x_T: torch.Tensor,
    acp: torch.Tensor,
    *,
    layers: list[str],
    steps: int,
    eta: float = 0.0,
    clip_x0: bool = False,
    seed: int = 0,
    sim_batch: int = 8,
    blocks: list[str] | None = None,
) -> dict:
    """Run DDIM from ``x_T`` with ``model`` and record, at every step (in sampling order, t decreasing):

    - ``ranges[layer]``: {"min", "p01", "p99", "max"} lists over steps of the whole batch's input of each of
      ``layers`` (module names relative to `inner_unet`, as ``feature_blocks()``), and ``shapes[layer]`` =
      [C, H, W] of that input;
    - ``features[block]``: [S, sim_batch, D] float32 CPU, the flattened outputs of the first ``sim_batch`` samples
      for each of ``blocks`` (default: every ``feature_blocks()`` entry; memory: S * sim_batch * D floats each);
    - ``t``: the S timesteps, and ``x0``: the final samples.
    """
    model.eval()
    blocks = list(model.feature_blocks()) if blocks is None else list(blocks)
    ranges = InputRanges(inner_unet(model), layers)
    taps = FeatureTaps(inner_unet(model), blocks)  # sees a TBS block's post-mix output (its hook runs first)
    denoise = as_denoiser(model)
    ts: list[int] = []
    feats: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}

    def recording(x: torch.Tensor, t: torch.Tensor, state):
        eps, state = denoise(x, t, state)
        ts.append(int(t[0]))
        for b, out in zip(blocks, taps.get()):
            feats[b].append(out[:sim_batch].flatten(1).float().cpu())
        return eps, state

    g = torch.Generator().manual_seed(seed)
    try:
        x0 = ddim_sample(recording, x_T, acp, steps=steps, eta=eta, generator=g, clip_x0=clip_x0)
    finally:
        ranges.remove()
        taps.remove()
    by_key = {name: {key: [row[key] for row in rows] for key in RANGE_KEYS} for name, rows in ranges.rows.items()}
    return {
        "t": ts,
        "ranges": by_key,
        "shapes": ranges.shapes,
        "features": {b: torch.stack(v) for b, v in feats.items()},
        "x0": x0,
    }


@torch.no_grad()
def feature_distances(
    student: nn.Module,
    teacher: nn.Module,
    x_T: torch.Tensor,
    acp: torch.Tensor,
    *,
    steps: int,
    eta: float = 0.0,
    clip_x0: bool = False,
    seed: int = 0,
    p: int = 4,
) -> dict:
    """Student vs teacher block outputs on the teacher's DDIM trajectory (the student sees the teacher's x_t and,
    for TBS, its own cache from the previous step, as `bidm.analysis.trajectory_eps_error`).

    Returns {"t": [S], "blocks": names, "l2": {block: [S]}, "spd": {block: [S]}}: per step the element-mean MSE
    (`l2_feature_loss`) and the SPD distance (`spd_loss` with ``p`` patches per side) of each feature pair.
    """
    student.eval(), teacher.eval()
    blocks = list(teacher.feature_blocks())
    if list(student.feature_blocks()) != blocks:
        raise ValueError("student and teacher feature_blocks() differ; cannot pair their features")
    s_taps = FeatureTaps(inner_unet(student), blocks)
    t_taps = FeatureTaps(inner_unet(teacher), blocks)
    s_denoise, t_denoise = as_denoiser(student), as_denoiser(teacher)
    out = {"t": [], "blocks": blocks, "l2": {b: [] for b in blocks}, "spd": {b: [] for b in blocks}}
    s_state = None

    def paired(x: torch.Tensor, t: torch.Tensor, t_state):
        nonlocal s_state
        eps, t_state = t_denoise(x, t, t_state)
        _, s_state = s_denoise(x, t, s_state)
        out["t"].append(int(t[0]))
        for b, fs, ft in zip(blocks, s_taps.get(), t_taps.get()):
            out["l2"][b].append(float(l2_feature_loss([fs], [ft])))
            out["spd"][b].append(float(spd_loss([fs], [ft], p)))
        return eps, t_state

    g = torch.Generator().manual_seed(seed)
    try:
        ddim_sample(paired, x_T, acp, steps=steps, eta=eta, generator=g, clip_x0=clip_x0)
    finally:
        s_taps.remove()
        t_taps.remove()
    return out
