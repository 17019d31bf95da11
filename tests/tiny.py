"""The tiny UNet most tests build (8x8, one channel, ~0.1 M parameters): config overrides, and a random-init FP
teacher saved as a bidm run. Later overrides win, so a test adds what it changes after these."""

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


def save_random_teacher(out, overrides=()):
    """A random-init FP teacher of ``TINY + overrides`` saved as a bidm run in ``out`` (what it learned does not
    matter to the tests that use it); returns ``out``."""
    import torch

    from bidm import checkpoint
    from bidm.config import load_config, to_dict
    from bidm.unet import DDIMUNet

    cfg = load_config(None, [*TINY, *overrides, f"out_dir={out}"])
    torch.manual_seed(0)
    model = DDIMUNet(cfg.model)
    checkpoint.save(out / checkpoint.CKPT_NAME, model=model.state_dict(), ema=model.state_dict(),
                    config=to_dict(cfg), step=1)  # fmt: skip
    return out
