"""Quantization-aware training of a binarized student: one objective for every method.

Every method goes through the same `bidm.train.run` loop with the same data order, budget and optimizer; this
module only resolves each method's own training signal (the "recipe") and adds per-step bookkeeping:

- ``bidm``: L_simple + lambda * SPD (feature_loss="spd") and the TBS cache pass (the student is a CrossTimestep).
- ``reactnet``: its distribution loss. ReActNet matches the FP network's output distribution with a KL term; for
  an eps-predicting Gaussian model the KL between N(eps_T, s^2 I) and N(eps_S, s^2 I) is ||eps_T - eps_S||^2 / 2s^2,
  i.e. an MSE to the teacher's eps, so the recipe sets output_kd = 1.
- ``efficientdm``: distillation from the FP model's output (EfficientDM's data-free QALoRA fine-tuning), output_kd=1.
- ``reste``: no extra loss; its estimator's power o is annealed by training progress (``set_progress`` hook).
- every other baseline: L_simple only (feature_loss="none", output_kd=0).
Explicit values in the config (feature_loss other than "auto", output_kd not null) override the recipe.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from bidm.config import Config
from bidm.distill import DistillObjective

RECIPES: dict[str, dict] = {
    "bidm": {"feature_loss": "spd", "output_kd": 0.0},
    "reactnet": {"feature_loss": "none", "output_kd": 1.0},
    "efficientdm": {"feature_loss": "none", "output_kd": 1.0},
}
DEFAULT_RECIPE = {"feature_loss": "none", "output_kd": 0.0}


def resolve_recipe(cfg: Config) -> Config:
    """A copy of ``cfg`` with the method's recipe filled in where the config says auto/null."""
    recipe = RECIPES.get(cfg.binarize.method, DEFAULT_RECIPE)
    b = cfg.binarize
    b = dataclasses.replace(
        b,
        feature_loss=recipe["feature_loss"] if b.feature_loss == "auto" else b.feature_loss,
        output_kd=recipe["output_kd"] if b.output_kd is None else b.output_kd,
    )
    return dataclasses.replace(cfg, binarize=b)


def binarized_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose weights are binarized (read from the ``w_bits`` attribute, whatever the method)."""
    return [m for m in model.modules() if getattr(m, "w_bits", 32) == 1 and isinstance(m.weight, torch.Tensor)]


class QATObjective(nn.Module):
    """`DistillObjective` plus the per-step hooks: progress-driven annealing and the sign-flip ratio."""

    def __init__(self, cfg: Config, teacher: nn.Module, acp: torch.Tensor):
        super().__init__()
        b = cfg.binarize
        self.distill = DistillObjective(
            teacher,
            acp,
            feature_loss=b.feature_loss,
            lam=b.spd_lambda,
            p=b.spd_p,
            loss_reduction=cfg.train.loss_reduction,
            loss_kind=cfg.train.loss_kind,
            output_kd=b.output_kd,
            antithetic=b.antithetic,
        )
        self._signs: list[torch.Tensor] | None = None
        self._flip_ratio = 0.0

    @torch.no_grad()
    def before_step(self, model: nn.Module, step: int, total: int) -> None:
        layers = binarized_layers(model)
        for layer in layers:
            if hasattr(layer, "set_progress"):
                layer.set_progress(step / max(total, 1))
        # the codes the binary op sees (EfficientDM's frozen latent weights move only through its adapters)
        signs = [layer.quantize_weight() >= 0 for layer in layers]  # sign(0) = +1
        if self._signs is not None:
            flipped = sum(int((a != b).sum()) for a, b in zip(signs, self._signs))
            self._flip_ratio = flipped / max(sum(s.numel() for s in signs), 1)
        self._signs = signs

    def forward(self, model, x0, generator, shard=None):
        loss, logs = self.distill(model, x0, generator, shard)
        logs["flip_ratio"] = self._flip_ratio
        return loss, logs


def train_student(cfg: Config, *, resume: bool = False) -> Path:
    """Load the teacher, binarize a copy of it with ``cfg.binarize.method`` and train it; returns the checkpoint."""
    from bidm.data import load_training_images
    from bidm.models import load_teacher, student_from_teacher
    from bidm.train import run, schedule

    cfg = resolve_recipe(cfg)
    teacher, model_cfg = load_teacher(cfg.binarize.teacher, cfg.model)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    torch.manual_seed(cfg.train.seed)  # new binarizer parameters (shortcuts, thresholds) are seeded
    student = student_from_teacher(teacher, cfg)
    images = load_training_images(cfg)
    objective = QATObjective(cfg, teacher, schedule(cfg))
    if cfg.first_stage.kind != "none":  # latent diffusion: distil on the first stage's latents
        from bidm.ldm.latents import prepare_latents

        cfg, images, wrap = prepare_latents(cfg, images)
        objective = wrap(objective)
    return run(cfg, student, objective, images, out_dir=cfg.out_dir, resume=resume)
