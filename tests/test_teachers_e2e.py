"""Every teacher kind the README names, through the CLI: `bidm binarize`, `bidm sample` and `bidm export`.

A bidm run (from `bidm train`), the official DDIM CIFAR-10 checkpoint layout (a torch.save'd state dict with the
official key names, read with weights_only=True) and a diffusers `UNet2DModel` directory (save_pretrained). Tiny
models, one training step, two DDIM steps: the whole file runs in seconds.
"""

import json

import numpy as np
import pytest
import torch
from tiny import TINY_MODEL

from bidm import checkpoint
from bidm.cli import main
from bidm.unet import DDIMUNet, UNetConfig

FAST = ["data.size=8", "data.limit=16", "train.batch_size=4", "train.steps=1", "train.log_every=1",
        "binarize.tbs_blocks=2", "sample.steps=2"]  # fmt: skip


def sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


def bidm_run(tmp_path):
    out = tmp_path / "teacher"
    assert main(["train", "--out", str(out), *sets(TINY_MODEL + FAST)]) == 0
    return out, []


def official_ckpt(tmp_path):
    """A state dict with the official pytorch_diffusion key names (temb.dense.0, down.0.block.0.conv1, ...)."""
    cfg = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=1,
                     out_ch=1, resolution=8)  # fmt: skip
    state = DDIMUNet(cfg).state_dict()
    assert "temb.dense.0.weight" in state and "down.0.block.0.conv1.weight" in state
    path = tmp_path / "model-tiny.ckpt"
    torch.save(state, path)
    return path, TINY_MODEL


def diffusers_dir(tmp_path):
    from diffusers import UNet2DModel

    path = tmp_path / "diffusers-unet"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 32),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=8, attention_head_dim=8).save_pretrained(path)  # fmt: skip
    return path, []


@pytest.mark.parametrize("make_teacher", [bidm_run, official_ckpt, diffusers_dir], ids=["bidm-run", "ddim-ckpt",
                                                                                          "diffusers"])  # fmt: skip
@pytest.mark.parametrize("method", ["xnor", "bidm"])
def test_teacher_through_binarize_sample_export(tmp_path, capsys, make_teacher, method):
    teacher, model_sets = make_teacher(tmp_path)
    student = tmp_path / "student"
    argv = ["binarize", "--teacher", str(teacher), "--method", method, "--out", str(student)]
    assert main(argv + sets(model_sets + FAST)) == 0, capsys.readouterr().err
    assert checkpoint.load(student).step == 1

    assert main(["sample", str(student), "--n", "3", "--steps", "2", "--batch-size", "2"]) == 0
    with np.load(student / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 8, 8, 1) and z["arr_0"].dtype == np.uint8
    record = json.loads((student / "samples.json").read_text())
    assert record["n"] == 3 and record["steps"] == 2 and record["weights"] == "ema" and not record["packed"]
    assert record["source"] == str(student.resolve()) and record["processes"] == 1

    packed = student / "packed.safetensors"
    assert main(["export", "--ckpt", str(student), "--out", str(packed)]) == 0
    assert "parity" in capsys.readouterr().out
    assert main(["sample", str(packed), "--n", "2", "--steps", "2", "--out", str(tmp_path / "packed-samples")]) == 0
    assert (tmp_path / "packed-samples" / "samples.png").is_file()
    record = json.loads((tmp_path / "packed-samples" / "samples.json").read_text())
    assert record["weights"] == "packed" and record["n"] == 2 and record["source"] == str(packed.resolve())
