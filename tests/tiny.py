"""Config overrides of the tiny UNet the CLI and reliability tests build (8x8, one channel, ~0.1 M parameters)."""

TINY_MODEL = [
    "model.ch=32",
    "model.ch_mult=[1, 2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[4]",
    "model.in_channels=1",
    "model.out_ch=1",
    "model.resolution=8",
    "model.dropout=0.0",
]
TINY = ["data.size=8", *TINY_MODEL]
