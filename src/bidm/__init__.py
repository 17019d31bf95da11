"""bidm: fully binarized (W1A1) diffusion models — BiDM and its baselines, trained, sampled, evaluated, packed.

import bidm
model = bidm.binarize_(fp_unet, "bidm")          # prepare: fake-binary layers, latent FP weights + STE
bidm.summary(model, (1, 3, 32, 32))               # per-layer bits / MACs / BOPs / OPs / size
bidm.spd_loss(student_feats, teacher_feats, p=4)  # Space Patched Distillation
"""

from bidm.binarize import METHODS, binarize_, default_filter, register
from bidm.diffusion import ddim_sample
from bidm.distill import spd_loss
from bidm.profile import summary
from bidm.tbs import CrossTimestep

__all__ = ["METHODS", "binarize_", "default_filter", "register", "ddim_sample", "spd_loss", "summary", "CrossTimestep"]
