"""The three latent-diffusion settings of the paper's Table 2, as the official LDM configs give them
(``configs/latent-diffusion/{lsun_bedrooms-ldm-vq-4, lsun_churches-ldm-kl-8, ffhq-ldm-vq-4}.yaml`` of
CompVis/latent-diffusion, = BiDM's ``{bedrooms,churches,ffhq}_bidm.yaml``): UNet and first-stage architecture,
fixed by the released checkpoints. ``configs/ldm/*.yaml`` hold the same sections (a test keeps them equal) plus the
training recipe; `bidm.profile` builds its ``ldm-*`` summary presets from these.

LDM's ``attention_resolutions`` are downsample factors ds; bidm's ``attn_resolutions`` are feature resolutions
(latent size / ds): bedrooms/FFHQ ds [8, 4, 2] at 64 -> [8, 16, 32]; churches ds [8, 4, 2, 1] at 32 -> [4, 8, 16, 32].
"""

from __future__ import annotations

VQ_F4 = dict(kind="vq", ch=128, ch_mult=[1, 2, 4], num_res_blocks=2, z_channels=3, embed_dim=3, n_embed=8192)
KL_F8 = dict(kind="kl", ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4, embed_dim=4, scale_by_std=True)

_LDM4 = dict(  # LDM-4 on VQ-f4 latents 64x64x3: 274.06 M params, 96.02 G MACs (reference §7)
    arch="ldm", ch=224, ch_mult=[1, 2, 3, 4], num_res_blocks=2, attn_resolutions=[8, 16, 32], dropout=0.0,
    in_channels=3, out_ch=3, resolution=64, num_head_channels=32,
)  # fmt: skip

SETTINGS = {
    "ldm-bedrooms": dict(model=_LDM4, first_stage=VQ_F4, image_size=256),
    "ldm-ffhq": dict(model=_LDM4, first_stage=VQ_F4, image_size=256),
    "ldm-churches": dict(  # LDM-8 on KL-f8 latents 32x32x4
        model=dict(
            arch="ldm",
            ch=192,
            ch_mult=[1, 2, 2, 4, 4],
            num_res_blocks=2,
            attn_resolutions=[4, 8, 16, 32],
            dropout=0.0,
            in_channels=4,
            out_ch=4,
            resolution=32,
            num_heads=8,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),  # fmt: skip
        first_stage=KL_F8,
        image_size=256,
    ),
}
