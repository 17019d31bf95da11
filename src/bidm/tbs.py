"""BiDM's cross-timestep connection (the model-level half of the Timestep-friendly Binary Structure, TBS).

Paper: Zheng et al., "BiDM: Pushing the Limit of Quantization for Diffusion Models", NeurIPS 2024, Eq. 12 and
App. A; official code ``openaimodel_ours.py`` / ``ddpm_ours.py::p_losses`` / ``ddim_ours.py``.

The output of each of the last ``n_blocks`` output blocks of the UNet is mixed with the same block's output at the
previous (noisier) timestep::

    out = (1 - alpha[bucket(t), j]) * h + alpha[bucket(t), j] * stopgrad(cache_j)

Notation (code name -> paper symbol):
    h        -> U_{m+1}^{t-1}, the block's normal output at the current step
    cache_j  -> U_{m+1}^{t}, the same block's output at the previous (noisier) step
    alpha    -> the learnable per-(timestep, block) mixing weight; table [num_buckets, n_blocks]

``alpha`` gets gradients from both terms; the cache gets none. Each sample of a batch gathers its own alpha from
its own t, with ``bucket(t) = t * num_buckets // num_timesteps`` (= floor(t / 10) for 100 buckets and T = 1000).

Where the cache comes from (reference §3, §9.6) -- a train/test mismatch inherent to BiDM:
    * Training (`cache_pass`): one extra no-grad student pass at t' = min(t + 1, T - 1) on
      x_{t'} = q_sample(x0, t', eps) with the *same* eps, with no mixing. The cache is therefore un-mixed.
      ``train_cache="t+K"`` (e.g. ``"t+10"`` for a 100-step sampler, ``"t+5"`` for 200 steps) or ``"sampler"``
      (K from ``sampler_steps``) moves t' to min(t + K, T - 1) to match the sampler stride; this is our
      improvement switch, not the paper's recipe. The cache stays un-mixed either way.
      ``cache_noise`` says how x_{t'} relates to x_t: ``"same"`` (official) noises x0 with the same eps, the
      joint of two steps of a deterministic (eta = 0) DDIM trajectory; ``"forward"`` draws
      x_{t'} ~ q(x_{t'} | x_t) = N(sqrt(a_{t'}/a_t) x_t, (1 - a_{t'}/a_t) I) with fresh noise, the joint of the
      forward process, which is what a stochastic (eta = 1, ancestral) sampler's consecutive steps follow. With
      "same" and an eta = 1 sampler the mix is trained on a cache far more like x_t than the one it meets.
      ``sample_cache`` says what the sampler carries to the next step: ``"mixed"`` (official) the post-mix outputs,
      so the mix compounds into a moving average over all earlier steps; ``"unmixed"`` the blocks' own outputs
      before the mix, which is what the training cache pass supplies.
    * Sampling (`denoise`): the cache is the previous *sampler* step's post-mix outputs (t + 10 with 100 DDIM
      steps, t + 5 with 200); the first step has no cache and so no mixing. The alpha row is always the one of the
      current t, so with 200 steps two consecutive steps share a row and with 50 steps every other row is unused.
      Samplers that pass no state (plain methods, which are never wrapped) run without TBS.

Generic over UNets: the wrapped model only has to expose ``feature_blocks()`` (module names in execution order,
output blocks last, each module returning one tensor) and, optionally, ``num_output_blocks()``. The forward hooks
are registered once, by module name, at construction. Wrap *after* `bidm.binarize.binarize_`: a hooked module that
is swapped later would silently lose its hook, so a forward in which a hooked block did not run raises. The hooks
act only inside the wrapper's own forward (a direct ``wrapper.unet(x, t)`` is the plain UNet), so activation
checkpointing inside the UNet, whose recomputation runs during backward, is not supported.

State dict: the table is ``alpha`` and every UNet tensor keeps its own name behind the ``unet.`` prefix, so
``wrapper.unet.state_dict()`` is the plain UNet's state dict and ``wrapper.state_dict()`` round-trips (alpha
included). The options (``n_blocks``, buckets, ...) are config, not state: rebuild the wrapper from them.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from bidm.diffusion import q_sample
from bidm.errors import ConfigError
from bidm.shard import BatchShard, whole

Cache = dict[str, torch.Tensor]
CACHE_NOISE = ("same", "forward")
SAMPLE_CACHE = ("mixed", "unmixed")


def timestep_bucket(t: torch.Tensor, num_buckets: int = 100, num_timesteps: int = 1000) -> torch.Tensor:
    """Row of the alpha table for each t in [0, num_timesteps): ``t * num_buckets // num_timesteps``."""
    return torch.div(t * num_buckets, num_timesteps, rounding_mode="floor")


def cross_timestep_mix(h: torch.Tensor, cache: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * h + alpha * stopgrad(cache); alpha broadcasts per sample, e.g. [B, 1, 1, 1]."""
    return (1 - alpha) * h + alpha * cache.detach()


def parse_train_cache(spec: str, num_timesteps: int = 1000, sampler_steps: int | None = None) -> int:
    """Offset k of the training cache pass t' = min(t + k, T - 1).

    ``"t+1"`` -> 1 (paper and official code); ``"t+K"`` -> K; ``"sampler"`` -> T // sampler_steps, the stride of
    a uniform DDIM sampler (10 for 100 steps, 5 for 200), so training sees the cache distance of sampling.
    """
    if spec == "sampler":
        if not sampler_steps or not 1 <= sampler_steps <= num_timesteps:
            raise ConfigError(
                f"train_cache='sampler' needs sampler_steps in [1, {num_timesteps}], got {sampler_steps}"
            )
        return max(1, num_timesteps // sampler_steps)
    match = re.fullmatch(r"t\+(\d+)", spec.replace(" ", ""))
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"train_cache must be 't+1' (paper), 't+K' with K >= 1, or 'sampler'; got {spec!r}")
    return int(match.group(1))


class CrossTimestep(nn.Module):
    """A UNet wrapped with BiDM's cross-timestep connection on its last ``n_blocks`` output blocks.

    Args:
        unet: any module with ``forward(x, t, **kw) -> eps`` and ``feature_blocks() -> list[str]``.
        n_blocks: how many output blocks, counted from the end, get the mix. 8 = paper (LDM, Table 6);
            App. A says 2 for CIFAR-10; 0 turns TBS off (the table is then [num_buckets, 0]).
        num_buckets: rows of the alpha table (100 -> one row per 10 timesteps of T = 1000).
        num_timesteps: T of the diffusion process.
        alpha_init: initial value of every alpha entry; 0.3 = paper (LDM code), 0.0 = official CIFAR code.
        train_cache: the timestep of the training cache pass (`cache_timestep`, `parse_train_cache`): ``"t+1"``
            (faithful), ``"t+K"``, or ``"sampler"`` (K = num_timesteps // sampler_steps).
        sampler_steps: DDIM steps of sampling; only read by ``train_cache="sampler"``.
        cache_noise: ``"same"`` (official) or ``"forward"``: how the training cache's x_{t'} is drawn
            (`cache_input`, module docstring).
        sample_cache: ``"mixed"`` (official) or ``"unmixed"``: the outputs `last_cache` hands to the next
            sampler step (module docstring).
        table_columns: 0 (default): the table is [num_buckets, n_blocks], mixed block j reads column j. N: the
            official LDM layout, [num_buckets, N] (N = 31 in every LDM setting) with each mixed block reading the
            column of its index among all feature blocks; the other columns are never read.

    Calls:
        ``wrapper(x, t, cache=None)`` -> eps. With a cache the mixed blocks mix, without one nothing mixes.
        `last_features` / `last_cache` then give this call's post-mix outputs of all feature blocks (live, for
        SPD) and of the mixed blocks (detached copies, for the next call).
        `cache_pass` (training) and `denoise` (sampling) build on that.
    """

    def __init__(
        self,
        unet: nn.Module,
        *,
        n_blocks: int = 8,
        num_buckets: int = 100,
        num_timesteps: int = 1000,
        alpha_init: float = 0.3,
        train_cache: str = "t+1",
        sampler_steps: int | None = None,
        cache_noise: str = "same",
        sample_cache: str = "mixed",
        table_columns: int = 0,
    ):
        super().__init__()
        if cache_noise not in CACHE_NOISE:
            raise ConfigError(f"cache_noise must be one of {CACHE_NOISE}, got {cache_noise!r}")
        self.cache_noise = cache_noise
        if sample_cache not in SAMPLE_CACHE:
            raise ConfigError(f"sample_cache must be one of {SAMPLE_CACHE}, got {sample_cache!r}")
        self.sample_cache = sample_cache
        self._premix: dict[str, torch.Tensor] = {}
        names = list(unet.feature_blocks())
        n_out = unet.num_output_blocks() if hasattr(unet, "num_output_blocks") else len(names)
        if not 0 <= n_blocks <= n_out:
            raise ConfigError(f"n_blocks must be in [0, {n_out}] (the UNet's output blocks), got {n_blocks}")
        if num_buckets < 1 or num_timesteps < num_buckets:
            raise ConfigError(f"need 1 <= num_buckets <= num_timesteps, got {num_buckets}, {num_timesteps}")
        self.unet = unet
        self.n_blocks = n_blocks
        self.num_buckets = num_buckets
        self.num_timesteps = num_timesteps
        self.train_cache = train_cache
        self.cache_offset = parse_train_cache(train_cache, num_timesteps, sampler_steps)
        if table_columns and table_columns < len(names):
            raise ConfigError(f"table_columns={table_columns} is fewer than the UNet's {len(names)} feature blocks")
        self.block_names = names
        self.mixed_names = names[len(names) - n_blocks :]
        if table_columns:  # official LDM layout: column = the block's index among all feature blocks
            self._column = {name: names.index(name) for name in self.mixed_names}
        else:
            self._column = {name: j for j, name in enumerate(self.mixed_names)}
        self.alpha = nn.Parameter(torch.full((num_buckets, table_columns or n_blocks), float(alpha_init)))
        # per-call state, set by forward and read by the hooks
        self._active = False
        self._alpha_rows: torch.Tensor | None = None  # [B, n_blocks]
        self._cache: Cache | None = None
        self._features: dict[str, torch.Tensor] = {}
        for name in names:
            unet.get_submodule(name).register_forward_hook(partial(self._hook, name))

    def __getstate__(self) -> dict:
        # deepcopy/pickle (e.g. an EMA copy) must not try to copy the last call's non-leaf activations
        state = self.__dict__.copy()
        state["_features"], state["_premix"] = {}, {}
        return state

    def extra_repr(self) -> str:
        return (
            f"n_blocks={self.n_blocks}, num_buckets={self.num_buckets}, num_timesteps={self.num_timesteps}, "
            f"train_cache={self.train_cache!r}, cache_noise={self.cache_noise!r}, sample_cache={self.sample_cache!r}"
        )

    def feature_blocks(self) -> list[str]:
        """The wrapped UNet's feature-block names (no ``unet.`` prefix), the keys of the teacher's taps too."""
        return list(self.block_names)

    def num_output_blocks(self) -> int:
        return self.unet.num_output_blocks()

    def mixed_columns(self) -> list[int]:
        """The alpha-table column of each mixed block, in `mixed_names` order."""
        return [self._column[name] for name in self.mixed_names]

    # ------------------------------------------------------------------ forward and hooks
    def forward(self, x: torch.Tensor, t: torch.Tensor, cache: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        self._features, self._premix = {}, {}
        self._cache = cache if self.n_blocks > 0 else None
        self._alpha_rows = self.alpha[timestep_bucket(t, self.num_buckets, self.num_timesteps)]  # [B, columns]
        self._active = True
        try:
            eps = self.unet(x, t, **kwargs)
        finally:
            self._active, self._cache, self._alpha_rows = False, None, None
        missing = [name for name in self.block_names if name not in self._features]
        if missing:
            raise RuntimeError(
                f"feature blocks {missing} did not run in this forward; was a hooked module replaced after "
                "wrapping? Apply binarize_ before CrossTimestep."
            )
        return eps

    def _hook(self, name: str, module: nn.Module, args: tuple, out: Any) -> torch.Tensor | None:
        if not self._active:  # a direct call of self.unet (or of the block) is plain
            return None
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"feature block {name!r} must return one tensor, got {type(out).__name__}")
        if name in self._features:
            raise RuntimeError(f"feature block {name!r} ran twice in one forward")
        if self._cache is not None and name in self._column:
            if name not in self._cache:
                raise KeyError(f"cache has no entry for mixed block {name!r}; it holds {sorted(self._cache)}")
            prev = self._cache[name]
            if prev.shape != out.shape:
                raise ValueError(
                    f"cache for {name!r} has shape {tuple(prev.shape)}, the block gives {tuple(out.shape)}"
                )
            if self.sample_cache == "unmixed":
                self._premix[name] = out.detach().clone()
            alpha = self._alpha_rows[:, self._column[name]].to(out.dtype)
            alpha = alpha.view(-1, *([1] * (out.dim() - 1)))  # [B, 1, 1, 1]
            out = cross_timestep_mix(out, prev, alpha)
        self._features[name] = out
        return out

    def last_features(self) -> list[torch.Tensor]:
        """Post-mix outputs of all feature blocks at the last forward, in execution order, still in the graph."""
        return [self._features[name] for name in self.block_names]

    def last_cache(self) -> Cache:
        """Detached copies of the last forward's outputs of the mixed blocks, keyed by module name: post-mix
        (``sample_cache="mixed"``, official) or, where this forward mixed, pre-mix (``"unmixed"``)."""
        return {
            name: self._premix[name] if name in self._premix else self._features[name].detach().clone()
            for name in self.mixed_names
        }

    def clear(self) -> None:
        """Drop the last forward's features (frees the activations they keep alive)."""
        self._features, self._premix = {}, {}

    # ------------------------------------------------------------------ training and sampling
    def cache_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """t' = min(t + k, T - 1), the timestep of the training cache pass (k = 1 for ``train_cache="t+1"``)."""
        return (t + self.cache_offset).clamp(max=self.num_timesteps - 1)

    def cache_input(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        acp: torch.Tensor,
        generator: torch.Generator,
        shard: BatchShard | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t'}, t') of the training cache pass for x_t = q_sample(x0, t, eps): ``cache_noise="same"`` gives
        q_sample(x0, t', eps); ``"forward"`` gives sqrt(r) x_t + sqrt(1 - r) z, r = a_{t'} / a_t, z ~ N(0, I)
        drawn from ``generator`` (on its device) for the global batch of ``shard`` (default: x_t is the whole
        batch), this process's rows kept."""
        t_cache = self.cache_timestep(t)
        if self.cache_noise == "same":
            return q_sample(x0, t_cache, eps, acp), t_cache
        a = acp.to(x_t.device)
        ratio = (a[t_cache] / a[t]).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        z = (shard or whole(x_t)).randn(tuple(x_t.shape[1:]), generator).to(x_t)
        return ratio.sqrt() * x_t + (1 - ratio).sqrt() * z, t_cache

    @torch.no_grad()
    def cache_pass(self, x_tp1: torch.Tensor, t_tp1: torch.Tensor, **kwargs: Any) -> Cache:
        """Training cache (reference §3 steps 2-3): a no-grad pass at t' with no mixing; returns its un-mixed
        outputs of the mixed blocks. The caller forms x_{t'} = q_sample(x0, t', eps) with the same eps as x_t.
        Runs in the wrapper's current train/eval mode, as the official code (dropout active in training)."""
        if self.n_blocks == 0:
            return {}
        self(x_tp1, t_tp1, cache=None, **kwargs)
        return self.last_cache()

    def denoise(self, x: torch.Tensor, t: torch.Tensor, state: Cache | None) -> tuple[torch.Tensor, Cache]:
        """Sampler interface of `bidm.diffusion.ddim_sample`: state = the previous step's post-mix cache."""
        eps = self(x, t, cache=state)
        return eps, self.last_cache()
