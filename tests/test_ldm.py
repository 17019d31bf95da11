"""Latent diffusion (issue 11): the LDM UNet and first stage load the official key layouts, the binarizers / TBS /
SPD apply as the reference says, the streamed data resumes to the same batches, and the CLI runs end to end on
tiny stand-ins (tests/ldm_fakes.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from ldm_fakes import TINY_KL, TINY_LDM, TINY_VQ, official_ckpt, randomize_, write_pngs

from bidm.config import load_config
from bidm.errors import CheckpointError, ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def _cfg(overrides):
    return load_config(None, list(overrides))


# ---------------------------------------------------------------------------------------------- UNet


@pytest.mark.parametrize("overrides", [TINY_LDM + TINY_VQ, TINY_KL], ids=["ldm4-like", "ldm8-like"])
def test_official_unet_keys_load_and_give_the_same_eps(tmp_path, overrides):
    from bidm.models import load_teacher

    unet, _ = official_ckpt(tmp_path / "model.ckpt", overrides)
    cfg = _cfg(overrides)
    teacher, model_cfg = load_teacher(tmp_path / "model.ckpt", cfg.model)
    x, t = torch.randn(2, cfg.model.in_channels, 8, 8), torch.tensor([3, 700])
    ref = unet(x, t)
    assert ref.abs().mean() > 1e-3  # a real output, not the zero-init last conv
    assert torch.equal(teacher(x, t), ref)
    assert model_cfg.arch == "ldm" and not any(p.requires_grad for p in teacher.parameters())


def test_official_unet_prefers_the_ema_copy(tmp_path):
    from bidm.ldm.official import convert_unet_state_dict, read_ckpt

    unet, _ = official_ckpt(tmp_path / "model.ckpt", TINY_LDM + TINY_VQ, ema=True)
    state = read_ckpt(tmp_path / "model.ckpt")
    ema, raw = convert_unet_state_dict(state), convert_unet_state_dict(state, prefer_ema=False)
    key = "input_blocks.3.1.qkv.weight"  # attention at the 4x4 level
    assert ema[key].shape == raw[key].shape == unet.state_dict()[key].shape  # Conv1d [3C, C, 1] -> Linear
    assert torch.equal(raw[key], unet.state_dict()[key]) and torch.equal(ema[key], raw[key] + 1.0)


def test_missing_checkpoint_names_the_official_release(tmp_path):
    from bidm.models import load_teacher

    with pytest.raises(
        CheckpointError, match=r"lsun_beds256/model.ckpt from https://ommer-lab.com/.*lsun_bedrooms.zip"
    ):
        load_teacher(tmp_path / "nope.ckpt", _cfg(TINY_LDM).model)


def test_full_bedrooms_unet_matches_the_reference_count():
    from bidm.profile import ldm_unet

    with torch.device("meta"):
        model = ldm_unet("ldm-bedrooms")
    assert sum(p.numel() for p in model.parameters()) == 274_056_163  # reference §7
    assert len(model.feature_blocks()) == 25 and model.num_output_blocks() == 12
    with torch.device("meta"):
        churches = ldm_unet("ldm-churches")
    assert len(churches.feature_blocks()) == 31  # 15 + 1 + 15, the official alpha table's width


def test_config_files_match_the_settings():
    from bidm.ldm.settings import SETTINGS

    for name, file in (("ldm-bedrooms", "bedrooms"), ("ldm-churches", "churches"), ("ldm-ffhq", "ffhq")):
        cfg = load_config(ROOT / f"configs/ldm/{file}.yaml")
        want = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in SETTINGS[name]["model"].items()])
        assert cfg.model == want.model, name
        for key, value in SETTINGS[name]["first_stage"].items():
            assert getattr(cfg.first_stage, key) == (tuple(value) if isinstance(value, list) else value), (name, key)
        assert (cfg.train.optimizer, cfg.train.lr, cfg.train.batch_size, cfg.train.steps) == ("adamw", 2e-5, 4, 200000)
        assert cfg.sample.steps == 200 and cfg.binarize.spd_lambda == 1e-2 and cfg.data.stream
        assert cfg.train.loss_kind == ("l1" if name == "ldm-churches" else "l2")
    assert load_config(ROOT / "configs/ldm/churches.yaml").diffusion.beta_end == 0.0155


def test_config_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


# ---------------------------------------------------------------------------------------------- binarization


def _student(overrides=TINY_LDM):
    from bidm.models import build_model

    cfg = _cfg([*overrides, "binarize.method=bidm", "binarize.tbs_blocks=4", "binarize.tbs_table_columns=31"])
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_bidm_on_the_ldm_unet_follows_the_reference():
    from bidm.binarize.bidm import BiDMConv2d, BiDMLinear

    model, _ = _student()
    unet = model.unet
    attn = unet.input_blocks[3][1]
    for layer in (attn.qkv, attn.proj_out):  # the 1-D convs: binary, no K map, no shortcut, no bias
        assert isinstance(layer, BiDMLinear) and not hasattr(layer, "filter_k") and not hasattr(layer, "shortcut")
        assert layer.bias is None
    res = unet.input_blocks[1][0]
    assert isinstance(res.in_layers[2], BiDMConv2d) and isinstance(res.emb_layers[1], BiDMLinear)
    assert res.in_layers[2].shortcut.scale.item() == pytest.approx(0.3)
    zero = res.out_layers[3]  # zero_module'd second conv: shortcut scale and k bias 0
    assert zero.shortcut.scale.item() == 0.0 and zero.filter_k.bias.item() == 0.0
    for name in ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2", "output_blocks.0.0.skip_connection"):
        assert type(unet.get_submodule(name)) in (nn.Conv2d, nn.Linear), name  # FP-kept
    assert isinstance(unet.input_blocks[2][0].op, BiDMConv2d)  # Downsample conv
    # TBS: the official [100, 31] table; the mixed (here: all 4) output blocks read their global column
    assert model.alpha.shape == (100, 31) and len(model.block_names) == 9
    assert model.mixed_columns() == [5, 6, 7, 8] and model.mixed_names == model.block_names[-4:]


def test_zero_init_shortcut_stays_zero_through_training():
    from bidm.diffusion import alphas_cumprod, make_betas
    from bidm.distill import DistillObjective
    from bidm.unet import build_unet

    model, cfg = _student()
    teacher = randomize_(build_unet(cfg.model)).eval().requires_grad_(False)
    objective = DistillObjective(teacher, alphas_cumprod(make_betas("sqrt_linear", 1000, 0.0015, 0.0195)).float(),
                                 feature_loss="spd", lam=1e-2)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss, logs = objective(model, torch.randn(2, 3, 8, 8), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["spd"] > 0  # SPD on all 9 feature blocks
    res = model.unet.input_blocks[1][0]
    assert res.out_layers[3].shortcut.scale.item() == 0.0
    assert res.in_layers[2].shortcut.scale.item() != pytest.approx(0.3)  # the live one moved
    assert model.alpha.grad is not None


def test_export_of_a_binarized_ldm_unet_is_smaller_and_exact(tmp_path):
    from bidm.config import to_dict
    from bidm.export import export_model, load_packed

    model, cfg = _student()
    model.eval()
    rep = export_model(model, tmp_path / "packed.safetensors", to_dict(cfg))
    assert rep["file_bytes"] == (tmp_path / "packed.safetensors").stat().st_size < rep["fp32_bytes"]
    packed, _ = load_packed(tmp_path / "packed.safetensors")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.allclose(packed(x, t), model(x, t), atol=1e-5)


def test_summary_prints_the_three_settings(capsys):
    from bidm.cli import main
    from bidm.profile import PRESETS

    assert PRESETS["ldm-ffhq"].input_shape == PRESETS["ldm-bedrooms"].input_shape  # the same LDM-4 UNet
    assert main(["summary", "--model", "ldm-churches", "--paper-accounting", "--no-layers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fp_params"] == 294_966_916 and data["size_saving"] > 28 and data["input_shape"] == [1, 4, 32, 32]


def test_summary_from_the_ldm_config(capsys):
    from bidm.cli import main

    config = str(ROOT / "configs/ldm/bedrooms.yaml")
    assert main(["summary", "--config", config, "--no-layers", "--json", "--method", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fp_params"] == 274_056_163 and data["input_shape"] == [1, 3, 64, 64]


# ---------------------------------------------------------------------------------------------- first stage


@pytest.mark.parametrize("overrides", [TINY_LDM + TINY_VQ, TINY_KL], ids=["vq", "kl"])
def test_first_stage_converts_compvis_keys(tmp_path, overrides):
    from bidm.ldm.first_stage import load_first_stage

    _, ae = official_ckpt(tmp_path / "model.ckpt", overrides, scale_factor=0.25)
    cfg = _cfg([*overrides, f"first_stage.ckpt={tmp_path / 'model.ckpt'}"])
    fs = load_first_stage(cfg.first_stage)
    assert fs.scale_factor == 0.25  # the checkpoint's buffer
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    h = ae.quant_conv(ae.encoder(x))
    z = fs.encode(x, torch.Generator().manual_seed(0))
    if cfg.first_stage.kind == "vq":
        assert torch.equal(z, 0.25 * h)
    else:
        mean = h.chunk(2, dim=1)[0]
        assert z.shape == mean.shape and not torch.equal(z, 0.25 * mean)  # a draw around the mean
    w = torch.randn(2, cfg.first_stage.embed_dim, 8, 8)
    assert torch.equal(fs.decode(0.25 * w), ae.decode(w).sample.clamp(-1, 1))
    assert not any(p.requires_grad for p in fs.parameters())


def test_first_stage_missing_file_names_the_release(tmp_path):
    from bidm.ldm.first_stage import load_first_stage

    cfg = _cfg([*TINY_VQ, f"first_stage.ckpt={tmp_path / 'vq.ckpt'}"])
    with pytest.raises(
        CheckpointError, match="vq-f4/model.ckpt from https://ommer-lab.com/files/latent-diffusion/vq-f4.zip"
    ):
        load_first_stage(cfg.first_stage)


def test_scale_by_std_estimates_from_the_first_batch(tmp_path):
    from bidm.ldm.latents import prepare_latents

    official_ckpt(tmp_path / "model.ckpt", TINY_KL)
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)
    del state["state_dict"]["scale_factor"]
    torch.save(state, tmp_path / "model.ckpt")
    cfg = _cfg(
        [
            *TINY_KL,
            f"first_stage.ckpt={tmp_path / 'model.ckpt'}",
            "first_stage.scale_by_std=true",
            "train.batch_size=4",
        ]
    )
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    out, data, wrap = prepare_latents(cfg, images)
    assert out.first_stage.scale_factor > 0 and data is images
    again, _, _ = prepare_latents(cfg, images)
    assert again.first_stage.scale_factor == out.first_stage.scale_factor  # seeded: resume resolves the same


def test_latent_cache_is_written_once_and_checked(tmp_path):
    from bidm.ldm.latents import Moments, prepare_latents

    official_ckpt(tmp_path / "model.ckpt", TINY_LDM + TINY_VQ)
    base = [*TINY_LDM, *TINY_VQ, f"first_stage.ckpt={tmp_path / 'model.ckpt'}", "data.workers=0"]
    cfg = _cfg([*base, f"first_stage.latent_cache={tmp_path / 'cache'}"])
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    _, data, _ = prepare_latents(cfg, images)
    assert isinstance(data, Moments) and len(data) == 5 and data[0].shape == (3, 8, 8)
    stamp = (tmp_path / "cache/moments.npy").stat().st_mtime_ns
    prepare_latents(cfg, images)
    assert (tmp_path / "cache/moments.npy").stat().st_mtime_ns == stamp  # reused
    with pytest.raises(DataError, match="holds other latents"):
        prepare_latents(_cfg([*base, f"first_stage.latent_cache={tmp_path / 'cache'}", "data.limit=4"]), images)


# ---------------------------------------------------------------------------------------------- streamed data


def test_streamed_folder_resumes_to_the_same_batches(tmp_path):
    from bidm.stream import ImageFolder, stream_batches
    from bidm.train import BatchOrder

    write_pngs(tmp_path / "imgs", 7)
    ds = ImageFolder(tmp_path / "imgs", 16)
    assert len(ds) == 7 and ds[0].shape == (3, 16, 16) and -1 <= ds[0].min() and ds[0].max() <= 1
    order = BatchOrder(len(ds), 2, seed=3)
    full = list(stream_batches(ds, order, 0, 8, workers=2))  # 3 batches per epoch: crosses two epochs
    resumed = list(stream_batches(ds, BatchOrder(len(ds), 2, seed=3), 5, 8, workers=1))
    assert len(full) == 8 and all(torch.equal(a, b) for a, b in zip(full[5:], resumed))
    assert not torch.equal(full[0], full[3])  # a new permutation each epoch
    in_ram = torch.stack([ds[i] for i in range(len(ds))])
    assert all(torch.equal(full[k], in_ram[order.indices(k)]) for k in range(8))


def test_streamed_folder_errors(tmp_path):
    from bidm.data import load_training_images

    cfg = _cfg(["data.name=folder", f"data.path={tmp_path / 'none'}", "data.stream=true"])
    with pytest.raises(DataError, match="image directory"):
        load_training_images(cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_training_images(_cfg(["data.name=folder", f"data.path={tmp_path / 'empty'}", "data.stream=true"]))
    with pytest.raises(DataError, match="image folders only"):
        load_training_images(_cfg(["data.stream=true"]))


def test_warmup_factor():
    from bidm.train import warmup_factor

    assert warmup_factor(0, 10) == pytest.approx(1e-6) and warmup_factor(5, 10) == pytest.approx(0.5, abs=1e-6)
    assert warmup_factor(10, 10) == warmup_factor(99, 10) == 1.0


# ---------------------------------------------------------------------------------------------- CLI end to end


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.mark.parametrize("overrides", [TINY_LDM + TINY_VQ, TINY_KL], ids=["vq", "kl"])
def test_cli_binarize_sample_export_on_official_layouts(tmp_path, overrides):
    from bidm.cli import main

    write_pngs(tmp_path / "imgs", 6)
    official_ckpt(tmp_path / "model.ckpt", overrides)
    run = tmp_path / "run"
    sets = _sets([*overrides, f"first_stage.ckpt={tmp_path / 'model.ckpt'}", "data.name=folder",
                  "data.stream=true", "data.workers=1", "train.steps=3", "train.batch_size=2", "train.log_every=1",
                  "binarize.tbs_blocks=2", "binarize.tbs_table_columns=31"])  # fmt: skip
    args = ["binarize", "--teacher", str(tmp_path / "model.ckpt"), "--method", "bidm", "--out", str(run)]
    assert main([*args, "--data-path", str(tmp_path / "imgs"), *sets]) == 0
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(math.isfinite(e["loss"]) and e["spd"] > 0 for e in logs)  # TBS + SPD trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["first_stage"]["scale_factor"] == 0.5 and saved["model"]["arch"] == "ldm"
    assert main(["sample", str(run), "--n", "3", "--steps", "3"]) == 0
    with np.load(run / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 16, 16, 3) and z["arr_0"].dtype == np.uint8  # decoded images, not latents
    assert main(["export", "--ckpt", str(run), "--out", str(tmp_path / "packed.safetensors")]) == 0
    assert main(["sample", str(tmp_path / "packed.safetensors"), "--n", "3", "--steps", "3", "--out",
                 str(tmp_path / "packed")]) == 0  # fmt: skip
    with np.load(tmp_path / "packed/samples.npz") as a, np.load(run / "samples.npz") as b:
        assert a["arr_0"].shape == b["arr_0"].shape


def test_cli_train_latent_teacher_then_xnor_student_resumes(tmp_path):
    from bidm import checkpoint
    from bidm.cli import main

    write_pngs(tmp_path / "imgs", 6)
    official_ckpt(tmp_path / "model.ckpt", TINY_LDM + TINY_VQ)
    base = [*TINY_LDM, *TINY_VQ, f"first_stage.ckpt={tmp_path / 'model.ckpt'}", "data.name=folder",
            f"data.path={tmp_path / 'imgs'}", "data.stream=true", "data.workers=0", "train.batch_size=2",
            "train.ckpt_every=2"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "teacher"), *_sets([*base, "train.steps=2"])]) == 0
    student = ["binarize", "--teacher", str(tmp_path / "teacher"), "--method", "xnor"]
    assert (
        main(
            [
                *student,
                "--out",
                str(tmp_path / "a"),
                *_sets(["train.steps=4", "train.ckpt_every=2", "train.batch_size=2"]),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                *student,
                "--out",
                str(tmp_path / "b"),
                *_sets(["train.steps=2", "train.ckpt_every=2", "train.batch_size=2"]),
            ]
        )
        == 0
    )
    assert main([*student, "--out", str(tmp_path / "b"), "--resume",
                 *_sets(["train.steps=4", "train.ckpt_every=2", "train.batch_size=2"])]) == 0  # fmt: skip
    a, b = checkpoint.load(tmp_path / "a"), checkpoint.load(tmp_path / "b")
    assert a.config["first_stage"]["kind"] == "vq"  # inherited from the teacher run
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)  # streamed + resumed = uninterrupted


def test_ldm_quality_bench_smoke(tmp_path):
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("ldm_quality", ROOT / "bench/ldm_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--out", str(tmp_path / "runs"), "--results", str(results), "--threads", "1"]) == 0
    rows = json.loads(results.read_text())["rows"]
    assert {r["method"] for r in rows} == {"fp32", "xnor", "bidm"}
    assert all(r["feature_space"] == "domain" and math.isfinite(r["fid"]) and "first_stage_psnr" in r for r in rows)
    assert all(math.isfinite(r["first_stage_recon_fid"]) for r in rows)  # the decoder's floor, scored alike
    with np.load(tmp_path / "runs/first_stage_recon/samples.npz") as z:
        assert z["arr_0"].shape == (16, 16, 16, 3) and z["arr_0"].std() > 0
    with np.load(tmp_path / "runs/bidm_s0/samples.npz") as z:
        assert z["arr_0"].shape == (16, 16, 16, 3)  # decoded 16x16 RGB digits, not 8x8 latents
    saved = yaml.safe_load((tmp_path / "runs/teacher/config.yaml").read_text())
    assert saved["first_stage"]["scale_factor"] > 0  # scale_by_std resolved and recorded


def test_ldm_quality_first_stage_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    """The bench's AE stage checkpoints every AE_CKPT_EVERY steps; killed after one, it resumes to the bit-identical
    autoencoder of an uninterrupted run (weights, Adam moments, both RNG streams restored)."""
    import importlib.util
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("ldm_quality_resume", ROOT / "bench/ldm_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "AE_CKPT_EVERY", 2)
    args = bench.parse_args(["--smoke", "--threads", "1"])
    budget = {**bench.SMOKE, "ae_steps": 5}
    bench.train_first_stage(args, budget, tmp_path / "a")

    class Killed(Exception):
        pass

    save = bench._save_ae_state

    def save_then_die(*a):
        save(*a)
        raise Killed

    monkeypatch.setattr(bench, "_save_ae_state", save_then_die)
    with pytest.raises(Killed):
        bench.train_first_stage(args, budget, tmp_path / "b")
    assert (tmp_path / "b/first_stage.partial.safetensors").is_file()
    monkeypatch.setattr(bench, "_save_ae_state", save)
    bench.train_first_stage(args, budget, tmp_path / "b")
    assert not (tmp_path / "b/first_stage.partial.safetensors").exists()
    a, b = (load_file(str(tmp_path / d / "first_stage.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_convs_binary_follows_the_paper_size_rule():
    from bidm.binarize import BinaryLayer
    from bidm.models import build_model

    name = "output_blocks.0.0.skip_connection"
    fp = build_model(_cfg([*TINY_LDM, "binarize.method=xnor"]))
    binary = build_model(_cfg([*TINY_LDM, "binarize.method=xnor", "binarize.skip_convs=binary"]))
    assert type(fp.get_submodule(name)) is nn.Conv2d and isinstance(binary.get_submodule(name), BinaryLayer)
    assert type(binary.get_submodule("input_blocks.0.0")) is nn.Conv2d  # the first conv stays FP either way
