"""Feature taps, feature-distillation losses (BiDM's SPD, plain L2) and the BiDM training objective.

Paper: Zheng et al., "BiDM", NeurIPS 2024, §3.3 Eq. 13-16 (SPD) and App. A; official code
``ddpm_ours.py::p_losses`` (LDM) and ``bidm-cifar/runners/diffusion_bidm.py::train`` (CIFAR).

Space Patched Distillation, per student/teacher feature pair F^s, F^t of shape [B, C, H, W] (p = 4):
    1. Split into p x p patches P: starts floor(linspace(0, W, p + 1)[:-1]) = i * W // p, size h = W // p, with W
       used for both axes as in the official code (``per_axis=True`` uses H for rows instead). A side that p
       does not divide leaves gaps/overlaps (6 with p = 4: h = 1, starts 0, 1, 3, 4); a side < p gives h = 0,
       i.e. empty patches. Faithful non-square features (H < W) have row patches cut off at H.
    2. Relation map A = P @ P^T over the last two axes: [B, C, h, h], a per-channel row-Gram matrix.
    3. Normalise by the Frobenius norm of the whole map (one scalar over B, C, h, h); a zero or empty map stays 0
       instead of dividing by zero (a plain A / ||A|| gives NaN for an all-zero map).
    4. Patch loss = ||A^s / ||A^s|| - A^t / ||A^t|| ||_F (not squared); the teacher is detached.
    L_SPD = mean over all (feature, patch) pairs, empty patches counted in the denominator (Eq. 16).

λ (weight of the feature loss): 1e-2 here, as both official code bases and paper App. A (LDM). The paper gives
3e-2 for CIFAR-10 in App. A and "4" in the main text (§3.3); reference §4 and §9.5 list the conflict.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from bidm.diffusion import eps_loss, q_sample
from bidm.errors import ConfigError
from bidm.shard import BatchShard, global_vector_norm, whole
from bidm.tbs import CrossTimestep

# ---------------------------------------------------------------------------------------------- feature taps


class FeatureTaps:
    """Records the outputs of named sub-modules of ``model`` at every forward of ``model``.

    The hooks are registered once, here. A pre-hook on ``model`` clears the record when its forward starts, so
    `get` after a forward returns exactly that forward's features (live tensors: detach them yourself if needed).
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [model.register_forward_pre_hook(self._clear_hook)]
        for name in self.names:
            self._handles.append(model.get_submodule(name).register_forward_hook(partial(self._hook, name)))

    def __getstate__(self) -> dict:
        # a deepcopy of the tapped model (e.g. EMA) copies these hooks; never copy live activations
        state = self.__dict__.copy()
        state["features"] = {}
        return state

    def _clear_hook(self, module: nn.Module, args: tuple) -> None:
        self.features = {}

    def _hook(self, name: str, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"tapped module {name!r} must return one tensor, got {type(out).__name__}")
        self.features[name] = out

    def get(self) -> list[torch.Tensor]:
        """The last forward's outputs in ``names`` order; raises if a tapped module did not run."""
        missing = [name for name in self.names if name not in self.features]
        if missing:
            raise RuntimeError(f"tapped modules {missing} did not run in the last forward (replaced after tapping?)")
        return [self.features[name] for name in self.names]

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        """Unregister every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.features = {}


# ---------------------------------------------------------------------------------------------- losses


def _check_pairs(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> None:
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need equally many (>= 1) features, got {len(student_feats)} and {len(teacher_feats)}")
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        if s.shape != t.shape:
            raise ValueError(f"feature {i}: student shape {tuple(s.shape)} != teacher shape {tuple(t.shape)}")


def patch_index(size: int, p: int) -> torch.Tensor:
    """Indices [p, size // p] of the p patches along an axis of length ``size``: row i = i*size//p + arange(h).

    i * size // p equals floor(linspace(0, size, p + 1)[:-1]) (exactly so for p a power of two, e.g. 4).
    """
    starts = torch.arange(p) * size // p
    return starts[:, None] + torch.arange(size // p)[None, :]


def gather_patches(feat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Patches [B, C, pr, pc, hr, hc] of ``feat`` at the patch indices ``rows`` [pr, hr] and ``cols`` [pc, hc].

    When the patches tile the map exactly (side = p * h, the common case) this is a reshape (no index gather,
    whose forward and backward cost ~10% of a BiDM training step); otherwise an advanced-index gather.
    """
    (pr, hr), (pc, hc) = rows.shape, cols.shape
    b, c, height, width = feat.shape
    if height == pr * hr and width == pc * hc:
        return feat.reshape(b, c, pr, hr, pc, hc).permute(0, 1, 2, 4, 3, 5)
    return feat[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def normalized_relation(feat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Per-patch row-Gram maps, each divided by its global Frobenius norm: [B, C, pr, pc, hr, hr].

    ``rows`` [pr, hr] and ``cols`` [pc, hc] are non-empty patch indices on ``feat``'s device, inside the feature
    (the caller zero-pads it where the faithful rule reaches past its edge).
    """
    patches = gather_patches(feat, rows, cols)  # [B, C, pr, pc, hr, hc]
    gram = patches @ patches.transpose(-1, -2)  # [B, C, pr, pc, hr, hr]
    norm = global_vector_norm(gram, dim=(0, 1, 4, 5), keepdim=True)  # [1, 1, pr, pc, 1, 1], over the global batch
    return gram / torch.where(norm > 0, norm, torch.ones_like(norm))  # an all-zero map stays 0


def spd_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: int = 4, *, per_axis: bool = False
) -> torch.Tensor:
    """BiDM's Space Patched Distillation (module docstring); returns a float32 scalar.

    ``per_axis=False`` (faithful) takes patch starts and size from W for both axes; ``True`` uses H for rows.
    Each patch loss is a norm over the batch too (as the official code's); under data parallelism it is the norm
    over the global batch (`bidm.shard.global_vector_norm`).
    """
    _check_pairs(student_feats, teacher_feats)
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_feats, teacher_feats):
        height, width = s.shape[-2:]
        rows, cols = patch_index(height if per_axis else width, p), patch_index(width, p)
        if rows.numel() == 0 or cols.numel() == 0:
            continue  # h = 0: every patch is empty and contributes 0, but still counts below
        # faithful rule on H < W: row patches reach past the bottom edge; zero rows add zero rows/cols to the maps,
        # which is the official cut-off slice's loss exactly
        s, t = s.float(), t.detach().float()
        pad_h = int(rows.max()) + 1 - height
        if pad_h > 0:
            s, t = F.pad(s, (0, 0, 0, pad_h)), F.pad(t, (0, 0, 0, pad_h))
        rows, cols = rows.to(s.device), cols.to(s.device)
        diff = normalized_relation(s, rows, cols) - normalized_relation(t, rows, cols)
        total = total + global_vector_norm(diff, dim=(0, 1, 4, 5)).sum()  # sum of the p*p patch losses
    return total / (len(student_feats) * p * p)


def l2_feature_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """Plain feature distillation (paper Table 7 ablation): mean over features of the element-mean MSE."""
    _check_pairs(student_feats, teacher_feats)
    losses = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(losses).mean()


# name -> loss(student_feats, teacher_feats, **options); None = no feature loss (the teacher may be skipped)
LOSSES = {"spd": spd_loss, "l2": l2_feature_loss, "none": None}


def sample_timesteps(
    n: int, num_timesteps: int, generator: torch.Generator, *, antithetic: bool = False
) -> torch.Tensor:
    """t ~ U{0..T-1}, int64 [n] on the generator's device. ``antithetic``: the first half is drawn and the second
    half is T - 1 - t (the DDIM/BiDM CIFAR code)."""
    if not antithetic:
        return torch.randint(0, num_timesteps, (n,), generator=generator, device=generator.device)
    t = torch.randint(0, num_timesteps, (n // 2 + 1,), generator=generator, device=generator.device)
    return torch.cat([t, num_timesteps - 1 - t])[:n]


# ---------------------------------------------------------------------------------------------- objective


class DistillObjective(nn.Module):
    """BiDM's training step (reference §3 "Training with random t", §4 "Total loss"); an objective of `bidm.train`.

    ``objective(model, x0, generator, shard=None) -> (loss, logs)`` with logs {"loss", "simple", "spd" | "feat",
    "kd"}, where
    ``model`` is the student: a `CrossTimestep`-wrapped or a plain UNet, possibly inside a DDP/Accelerate wrapper
    (reached through ``.module``); it needs ``feature_blocks()`` when a feature loss is on.
        1. t ~ U{0..T-1} (or antithetic), then eps ~ N(0, I), both from ``generator`` (so a resume is exact).
        2. TBS student only: cache = student.cache_pass(q_sample(x0, t', eps), t') with t' = min(t + 1, T - 1)
           (``student.train_cache``), no grad, no mixing, the same eps (``cache_noise="forward"``: x_{t'} drawn
           from q(x_{t'} | x_t) instead, see `bidm.tbs.CrossTimestep.cache_input`).
        3. x_t = q_sample(x0, t, eps).
        4. Teacher at t, no grad, feature blocks tapped (skipped when neither feature loss nor output KD needs it).
        5. Student at t with the cache (TBS) or plain; its feature-block outputs (post-mix for TBS).
        6. loss = eps_loss(eps_hat, eps) + lam * feature_loss(student feats, teacher feats)
                  + output_kd * eps_loss(eps_hat, teacher eps, kind="l2")   (output_kd = 0 in BiDM)

    Args:
        teacher: the FP UNet; frozen and kept in eval mode here. May be None if feature_loss="none" and
            output_kd=0. A sub-module, so ``objective.to(device)`` moves it; it has no trainable parameters.
        acp: alphas_cumprod [T] (its length is T).
        feature_loss: "spd" (BiDM), "l2" (ablation) or "none" (plain QAT).
        lam: weight of the feature loss; 1e-2 = code and paper App. A (LDM). See the module docstring.
        p: SPD patches per side. spd_per_axis: see `spd_loss`.
        loss_reduction / loss_kind: of the eps loss (`bidm.diffusion.eps_loss`): "mean"/"l2" = LDM, "sum"/"l2" =
            CIFAR code, "mean"/"l1" = LDM churches.
        output_kd: weight of output distillation against the teacher's eps (not in BiDM; default 0).
        tbs: None = use the cross-timestep cache iff the student is a `CrossTimestep`; False runs a wrapper
            without a cache (no mixing in training); True insists on a wrapper.
        antithetic: antithetic t as in the CIFAR code.
    A plain student gets `FeatureTaps` at its first call. Dropout uses the global RNG, not ``generator``.
    """

    def __init__(
        self,
        teacher: nn.Module | None,
        acp: torch.Tensor,
        *,
        feature_loss: str = "spd",
        lam: float = 1e-2,
        p: int = 4,
        spd_per_axis: bool = False,
        loss_reduction: str = "mean",
        loss_kind: str = "l2",
        output_kd: float = 0.0,
        tbs: bool | None = None,
        antithetic: bool = False,
    ):
        super().__init__()
        if feature_loss not in LOSSES:
            raise ConfigError(f"unknown feature_loss {feature_loss!r}; expected one of {sorted(LOSSES)}")
        self.feature_loss, self.lam, self.p, self.spd_per_axis = feature_loss, lam, p, spd_per_axis
        self.loss_reduction, self.loss_kind = loss_reduction, loss_kind
        self.output_kd, self.tbs, self.antithetic = output_kd, tbs, antithetic
        self.feat_key = "spd" if feature_loss == "spd" else "feat"
        self.needs_teacher = feature_loss != "none" or output_kd > 0
        if self.needs_teacher and teacher is None:
            raise ConfigError(f"feature_loss={feature_loss!r} / output_kd={output_kd} need a teacher")
        self.teacher = teacher
        self.register_buffer("acp", acp.clone(), persistent=False)
        self.num_timesteps = len(acp)
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        self.teacher_taps = FeatureTaps(teacher, teacher.feature_blocks()) if feature_loss != "none" else None
        self._student_taps: FeatureTaps | None = None
        # the student last checked/tapped; a weak reference, so it is not registered as a sub-module
        self._tapped: weakref.ref | None = None

    def train(self, mode: bool = True) -> DistillObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the FP teacher never uses dropout
        return self

    def _use_cache(self, student: nn.Module) -> bool:
        wrapped = isinstance(student, CrossTimestep)
        if self.tbs and not wrapped:
            raise ConfigError("tbs=True needs the student wrapped in bidm.tbs.CrossTimestep")
        if wrapped and student.num_timesteps != self.num_timesteps:
            raise ConfigError(f"student TBS num_timesteps {student.num_timesteps} != len(acp) {self.num_timesteps}")
        return wrapped if self.tbs is None else self.tbs

    def _student_features(self, student: nn.Module) -> list[torch.Tensor]:
        if isinstance(student, CrossTimestep):
            return student.last_features()
        return self._student_taps.get()

    def _tap_student(self, student: nn.Module) -> None:
        """Check the feature names once per student and hook a plain one (before its forward)."""
        if self.feature_loss == "none" or (self._tapped is not None and self._tapped() is student):
            return
        if list(student.feature_blocks()) != self.teacher_taps.names:
            raise ConfigError("student and teacher feature_blocks() differ; SPD pairs them by position")
        if self._student_taps is not None:
            self._student_taps.remove()
        self._student_taps = (
            None if isinstance(student, CrossTimestep) else FeatureTaps(student, self.teacher_taps.names)
        )
        self._tapped = weakref.ref(student)

    def _clear_features(self, student: nn.Module) -> None:
        # the graph holds what backward needs; the records would only keep activations alive until the next step
        self.teacher_taps.clear()
        if isinstance(student, CrossTimestep):
            student.clear()
        else:
            self._student_taps.clear()

    def _feature_loss(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
        if self.feature_loss == "spd":
            return spd_loss(student_feats, teacher_feats, self.p, per_axis=self.spd_per_axis)
        return LOSSES[self.feature_loss](student_feats, teacher_feats)

    def forward(
        self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator, shard: BatchShard | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        student = getattr(model, "module", model)  # DDP/Accelerate wrap: hooks and attributes live on the module
        use_cache = self._use_cache(student)
        self._tap_student(student)
        shard = shard or whole(x0)

        # 1. all randomness from the generator, drawn for the global batch on its device, then this process's rows
        t = shard.take(sample_timesteps(shard.n, self.num_timesteps, generator, antithetic=self.antithetic))
        noise = shard.randn(tuple(x0.shape[1:]), generator).to(x0)
        t = t.to(x0.device)

        # 2. training cache from t' (no grad, no mix, same eps)
        cache = None
        if use_cache:
            x_cache, t_cache = student.cache_input(
                x0, q_sample(x0, t, noise, self.acp), t, noise, self.acp, generator, shard
            )
            cache = student.cache_pass(x_cache, t_cache)

        # 3.-4. x_t and the teacher
        x_t = q_sample(x0, t, noise, self.acp)
        eps_teacher = None
        if self.needs_teacher:
            with torch.no_grad():
                eps_teacher = self.teacher(x_t, t)

        # 5. the student, through the (possibly DDP-wrapped) model so gradients sync
        eps_hat = model(x_t, t, cache=cache) if isinstance(student, CrossTimestep) else model(x_t, t)

        # 6. the loss
        simple = eps_loss(eps_hat, noise, reduction=self.loss_reduction, kind=self.loss_kind)
        zero = simple.new_zeros(())
        feat = zero
        if self.feature_loss != "none":
            feat = self._feature_loss(self._student_features(student), self.teacher_taps.get())
            self._clear_features(student)
        kd = zero
        if self.output_kd > 0:
            kd = eps_loss(eps_hat, eps_teacher, reduction=self.loss_reduction, kind="l2")
        loss = simple + self.lam * feat + self.output_kd * kd

        values = torch.stack([v.detach().float() for v in (loss, simple, feat, kd)]).tolist()  # one device sync
        logs = dict(zip(["loss", "simple", self.feat_key, "kd"], values))
        return loss, logs
