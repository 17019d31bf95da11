"""Efficiency summary: hand-counted MACs/bits on a tiny model, the paper's LDM-4 bedrooms numbers, the CLI."""

import json
import math

import pytest
import torch.nn as nn

import bidm.profile
from bidm.binarize import binarize_
from bidm.profile import build_preset, summarize


def tiny():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 10))


def test_hand_counted_fp_model():
    s = summarize(tiny(), (1, 3, 8, 8))
    conv_macs, lin_macs = 4 * 8 * 8 * 3 * 9, 256 * 10
    assert [r.macs for r in s.layers if r.role == "fp"] == [conv_macs, lin_macs]
    assert s.fp_flops == s.flops == conv_macs + lin_macs and s.bops == 0
    assert s.params == s.fp_params == 108 + 4 + 2560 + 10
    assert math.isclose(s.size_mib, 32 * s.params / (8 * 2**20)) and s.size_saving == 1.0


def test_hand_counted_binarized_model():
    model = binarize_(tiny(), "xnor", filter_fn=lambda m, name: True)
    s = summarize(model, (2, 3, 8, 8))
    macs = 2 * (4 * 8 * 8 * 3 * 9 + 256 * 10)
    assert s.bops == macs and s.fp_flops == macs and s.flops == 0 and s.ops == macs / 64
    assert s.ops_saving == 64
    # xnor drops the FP biases; keeps a 3x3 box filter (9 floats) for K; weights at 1 bit
    assert s.fp_params == 108 + 4 + 2560 + 10 and s.params == 108 + 9 + 2560
    fp_bits, bits = 32 * s.fp_params, 108 + 2560 + 32 * 9
    assert math.isclose(s.size_saving, fp_bits / bits)
    paper = summarize(model, (2, 3, 8, 8), accounting="paper")
    assert math.isclose(paper.size_mib * 8 * 2**20, 108 + 2560 + 32 * (4 + 10))  # FP biases at 32, no K buffer


def test_counting_leaves_the_model_untouched():
    model = binarize_(tiny(), "efficientdm", filter_fn=lambda m, name: True).train()
    model[2].eval()
    s = summarize(model, (2, 3, 8, 8))
    assert s.bops == 2 * (4 * 8 * 8 * 3 * 9 + 256 * 10)
    assert model[0].training and not model[2].training
    assert not model[0].act_step_ready.any()  # no calibration on the dummy input
    assert s.params == s.fp_params + 2 * 100 + (4 + 10)  # + s_a [100] and s_w [Cout] per layer; LoRA is merged


def test_callable_module_prints_table(capsys):
    s = bidm.summary(tiny(), (1, 3, 8, 8))
    out = capsys.readouterr().out
    assert "OPs saving" in out and "Conv2d" in out and s.bops == 0


def test_ldm_bedrooms_reproduces_paper_table4():
    model, preset = build_preset("ldm-bedrooms", "bidm")
    s = summarize(model, preset.input_shape, accounting="paper", paper_flops=preset.paper_flops)
    assert s.fp_params == 274_056_163
    assert math.isclose(s.fp_flops, 96.02e9, rel_tol=1e-3)
    assert math.isclose(s.fp_size_mib, 1045.4, rel_tol=1e-3)
    assert math.isclose(s.bops, 92.09e9, rel_tol=1e-3)
    assert math.isclose(s.size_mib, 37.10, rel_tol=2e-3)
    assert math.isclose(s.size_saving, 28.0, rel_tol=0.01)
    assert math.isclose(s.ops_saving, 52.7, rel_tol=0.01)
    measured = summarize(model, preset.input_shape)  # honest count: FP skip convs and BiDM's FP shortcuts are FLOPs
    assert measured.bops == s.bops and measured.flops > 3.88e9 and measured.ops_saving < 20


def test_ddim_cifar10_counts():
    model, preset = build_preset("ddim-cifar10", None)
    s = summarize(model, preset.input_shape)
    assert s.fp_params == 35_746_307 and math.isclose(s.fp_flops, 6.05e9, rel_tol=0.01)


@pytest.mark.parametrize("extra", [[], ["--paper-accounting"]])
def test_cli_json(capsys, extra):
    from bidm.cli import main

    assert main(["summary", "--model", "tiny", "--method", "xnor", "--json", "--no-layers", *extra]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("fp_size_mib", "size_mib", "size_saving", "fp_flops", "bops", "flops", "ops", "ops_saving"):
        assert key in data
    assert data["method"] == "xnor" and data["bops"] > 0


def test_cli_rejects_unknown_preset(capsys):
    from bidm.cli import main

    assert main(["summary", "--model", "nope"]) == 1
    assert "choose one of" in capsys.readouterr().err
