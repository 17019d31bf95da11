"""Named recipes load, per-method options apply to their method only, the generic npz dataset, and the bench's
committed-results bookkeeping (merge, stale rows, mean +- std)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from bidm.analysis import bucket_means, colour_error, eps_error_by_timestep, eps_gain, trajectory_eps_error
from bidm.config import load_config
from bidm.data import load_dataset
from bidm.diffusion import alphas_cumprod, make_betas
from bidm.errors import DataError
from bidm.models import build_model, method_options

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


def test_recipes_exist_and_load():
    names = {p.name for p in RECIPES}
    assert {"paper_cifar10.yaml", "paper_ldm.yaml", "cpu_cifar16.yaml"} <= names
    cifar = load_config(ROOT / "configs/recipes/paper_cifar10.yaml")
    assert (cifar.train.lr, cifar.train.batch_size, cifar.train.steps) == (6e-5, 64, 100000)
    assert cifar.train.loss_reduction == "sum" and cifar.train.ema_decay == 0.9999 and cifar.train.grad_clip == 1.0
    assert cifar.sample.steps == 100 and cifar.sample.eta == 0.0
    assert method_options(cifar) == {"shortcut_scale_init": 0.0, "shortcut_abs": False}
    ldm = load_config(ROOT / "configs/recipes/paper_ldm.yaml")
    assert (ldm.train.optimizer, ldm.train.lr, ldm.train.batch_size, ldm.train.steps) == ("adamw", 2e-5, 4, 200000)
    assert ldm.train.loss_reduction == "mean" and ldm.diffusion.schedule == "sqrt_linear"
    cpu = load_config(ROOT / "configs/recipes/cpu_cifar16.yaml")
    assert cpu.train.steps >= 2000


def test_method_options_apply_to_their_method_only():
    tiny = ["model.ch=32", "model.ch_mult=[1, 2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
            "model.resolution=8", "binarize.method_options.bidm.shortcut_scale_init=0.0",
            "binarize.method_options.bidm.shortcut_abs=false"]  # fmt: skip
    bidm = build_model(load_config(None, [*tiny, "binarize.method=bidm"]))
    scales = [m.shortcut.scale for m in bidm.modules() if hasattr(m, "shortcut") and m.shortcut.scale is not None]
    assert scales and all(float(s) == 0.0 for s in scales)
    xnor = build_model(load_config(None, [*tiny, "binarize.method=xnor"]))  # bidm's options do not reach xnor
    assert not any(hasattr(m, "shortcut") for m in xnor.modules())
    cfg = load_config(None, [*tiny, "binarize.method=bidm", "binarize.options={shortcut_scale_init: 0.5}"])
    assert method_options(cfg)["shortcut_scale_init"] == 0.5  # options win


def test_npz_dataset(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images)
    x, y = load_dataset("npz", path=str(tmp_path), split="train", size=4)
    assert x.shape == (5, 3, 4, 4) and y is None and x.min() >= -1 and x.max() <= 1
    x, _ = load_dataset("npz", path=str(tmp_path / "train.npz"))
    assert torch.allclose((x[0].permute(1, 2, 0) + 1) * 127.5, torch.from_numpy(images[0]).float(), atol=0.51)
    with pytest.raises(DataError, match="test.npz"):
        load_dataset("npz", path=str(tmp_path), split="test")
    with pytest.raises(DataError, match="data.path"):
        load_dataset("npz", path=None)


class _Const(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, t):
        return self.scale * x


def test_eps_error_functions_on_known_answers():
    acp = alphas_cumprod(make_betas()).float()
    x0 = torch.zeros(4, 1, 2, 2)  # x_t = s * eps with s = sqrt(1 - a_t): teacher x -> s eps, student 2x -> 2s eps
    m = float(torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).square().mean())
    rows = eps_error_by_timestep(_Const(2.0), _Const(1.0), x0, acp, [999, 500], seed=0)
    assert [r["t"] for r in rows] == [999, 500]
    for r in rows:
        s = float((1 - acp[r["t"]]).sqrt())
        assert r["student_vs_teacher"] == pytest.approx(s**2 * m, rel=1e-5)
        assert r["teacher_vs_true"] == pytest.approx((s - 1) ** 2 * m, rel=1e-4, abs=1e-9)
        assert r["student_vs_true"] == pytest.approx((2 * s - 1) ** 2 * m, rel=1e-5)
    same = trajectory_eps_error(_Const(1.0), _Const(1.0), torch.randn(3, 1, 2, 2), acp, steps=10)
    assert len(same) == 10 and all(r["student_vs_teacher"] == 0 for r in same)
    assert all(r["gain"] == pytest.approx(1.0) and r["colour_error"] == 0 for r in same)
    half = trajectory_eps_error(_Const(0.5), _Const(1.0), torch.randn(3, 1, 2, 2), acp, steps=10)
    assert all(r["gain"] == pytest.approx(0.5) for r in half)  # the student reproduces half the teacher's eps
    assert [r["t"] for r in same] == sorted((r["t"] for r in same), reverse=True)
    rows = [{"t": 5, "v": 1.0}, {"t": 50, "v": 3.0}, {"t": 500, "v": 7.0}]
    assert bucket_means(rows, "v", (0, 100, 1000)) == {"0-100": 2.0, "100-1000": 7.0}


def test_colour_error_counts_only_the_mean_per_channel():
    teacher = torch.zeros(2, 3, 4, 4)
    zero_mean = torch.randn(2, 3, 4, 4)
    zero_mean -= zero_mean.mean(dim=(-2, -1), keepdim=True)
    assert colour_error(zero_mean, teacher) == pytest.approx(0.0, abs=1e-12)
    shifted = torch.zeros(2, 3, 4, 4)
    shifted[0, 1] += 0.5  # one image's green channel shifted by 0.5: 1 of 6 (image, channel) means is off
    assert colour_error(shifted, teacher) == pytest.approx(0.25 / 6)
    assert eps_gain(2 * shifted, shifted) == pytest.approx(2.0)


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def _row(method, seed, fid, commit, space="inception", **kw):
    return {"method": method, "variant": kw.get("variant"), "seed": seed, "feature_space": space, "fid": fid,
            "sfid": fid / 2, "precision": 0.5, "recall": 0.1, "steps": 2000, "n_samples": 2000, "n_ref": 10000,
            "commit": commit, "dirty": kw.get("dirty", False), "machine": "m", "config_hash": "h",
            "epoch": kw.get("epoch", 1)}  # fmt: skip


def test_results_merge_render_and_stale(tmp_path):
    P = _bench_module("protocol")
    head = P._git("rev-parse", "HEAD")
    path = tmp_path / "r.json"
    P.add_rows(path, [_row("xnor", 0, 30.0, head), _row("xnor", 1, 34.0, head), _row("bidm", 0, 20.0, head)])
    P.add_rows(path, [_row("bidm", 0, 22.0, head), _row("bidm", 1, 24.0, head, dirty=True)])  # replaces seed 0
    data = P.load_results(path)
    assert len(data["rows"]) == 4 and data["protocol"]["n_ref"] >= 10000
    md = P.render_markdown(data)
    bidm_line = next(line for line in md.splitlines() if line.startswith("| bidm"))
    assert "23.0 ± 1.4" in bidm_line and "†" in bidm_line  # mean ± sample std; the dirty row marks it stale
    assert "32.0 ± 2.8" in next(line for line in md.splitlines() if line.startswith("| xnor"))
    assert "trained from uncommitted code" in md
    assert P.is_stale(_row("xnor", 0, 1.0, head, epoch=P.CODE_EPOCH - 1)).startswith("code epoch")
    assert P.is_stale(_row("xnor", 0, 1.0, head, epoch=P.CODE_EPOCH)) is None
    m, s = P.mean_std([1.0])
    assert m == 1.0 and math.isnan(s)


def test_protocols_v2_v3_differ_in_lr_only_and_keep_their_files_apart(tmp_path):
    """v3 = the recipe (validated lr 2e-3); v2 = the recipe + train.lr=5e-4; a results file refuses the other's rows
    before anything trains."""
    from bidm.config import to_dict
    from bidm.qat import resolve_recipe

    P = _bench_module("protocol")
    assert P.PROTOCOL is P.PROTOCOLS["cifar16-v3"] and P.get_protocol("v2") is P.PROTOCOLS["cifar16-v2"]
    with pytest.raises(SystemExit, match="unknown protocol"):
        P.get_protocol("v9")
    teacher = ROOT / "bench/teachers/cifar16"  # the committed teacher run
    cfgs = {v: resolve_recipe(P.student(teacher, "bidm", 3, tmp_path / v, "d.npz", protocol=P.get_protocol(v)))
            for v in ("v2", "v3")}  # fmt: skip
    assert (cfgs["v2"].train.lr, cfgs["v3"].train.lr) == (5e-4, 2e-3)
    d2, d3 = to_dict(cfgs["v2"]), to_dict(cfgs["v3"])
    for d in (d2, d3):
        d.pop("out_dir")
        d["train"].pop("lr")
    assert d2 == d3 and cfgs["v3"].train.seed == 3
    path = tmp_path / "v3.json"
    P.add_rows(path, [_row("bidm", 0, 20.0, "c")], protocol=P.get_protocol("v3"))
    P.check_results_file(path, P.get_protocol("v3"))  # its own protocol: fine
    with pytest.raises(SystemExit, match="holds protocol 'cifar16-v3' rows"):
        P.add_rows(path, [_row("bidm", 1, 21.0, "c")], protocol=P.get_protocol("v2"))
    assert len(P.load_results(path)["rows"]) == 1  # nothing written


def test_rows_for_reads_what_the_pipeline_writes(tmp_path):
    import json as _json

    from bidm import checkpoint
    from bidm.config import to_dict
    from bidm.evaluate import write_metrics

    P = _bench_module("protocol")
    cfg = load_config(None, ["binarize.method=xnor", "train.steps=7"])
    checkpoint.save(tmp_path / "checkpoint.safetensors", model={"w": torch.zeros(2)}, config=to_dict(cfg), step=7)
    results = [{"feature_space": s, "fid": f, "sfid": None, "precision": 0.5, "recall": 0.25, "n_samples": 20,
                "n_reference": 40} for s, f in (("inception", 90.0), ("domain", 9.0))]  # fmt: skip
    write_metrics(results, tmp_path)
    metrics = _json.loads((tmp_path / "metrics.json").read_text())
    result = {"metrics": metrics, "summary": {"size_mib": 1.0, "ops": 2.0}, "sample_s": 3.0}
    rows = P.rows_for({"method": "xnor", "seed": 0}, tmp_path, P.code_version(), result, train_s=None)
    assert [(r["feature_space"], r["fid"], r["steps"], r["n_ref"]) for r in rows] == [
        ("inception", 90.0, 7, 40), ("domain", 9.0, 7, 40)]  # fmt: skip
    assert rows[0]["config_hash"] == P.config_hash(cfg) and rows[0]["epoch"] == P.CODE_EPOCH


def test_eta_study_views_and_protocol_record(tmp_path):
    """bench/eta_study.py samples a linked checkpoint in its own directory (the run's samples stay untouched; a view
    re-pointed at another run drops the old samples) and its results file records the eta it was scored with."""
    from bidm import checkpoint

    E = _bench_module("eta_study")
    runs = []
    for i in range(2):
        run = tmp_path / f"run{i}"
        checkpoint.save(run / "checkpoint.safetensors", model={"w": torch.full((2,), float(i))}, config={}, step=i)
        (run / "samples.npz").write_bytes(b"protocol samples")
        (run / "config.yaml").write_text(f"data: {{size: {16 + i}}}\n")
        runs.append(run)
    v = E.view(runs[0], tmp_path / "view")
    assert (v / "checkpoint.safetensors").resolve() == (runs[0] / "checkpoint.safetensors").resolve()
    assert "size: 16" in (v / "config.yaml").read_text()  # the scorer reads the training resolution here
    (v / "samples.npz").write_bytes(b"eta-0 samples of run0")
    assert E.view(runs[0], tmp_path / "view") == v and (v / "samples.npz").is_file()  # same run: kept
    E.view(runs[1], tmp_path / "view")
    assert not (v / "samples.npz").exists() and (v / "checkpoint.safetensors").resolve().parent == runs[1]
    assert "size: 17" in (v / "config.yaml").read_text()
    assert all((r / "samples.npz").read_bytes() == b"protocol samples" for r in runs)
    path = tmp_path / "eta0.json"
    E.P.add_rows(path, [_row("bidm", 2, 150.0, "c")], protocol={**E.P.PROTOCOL, "eta": 0.0})
    assert E.P.load_results(path)["protocol"]["eta"] == 0.0


def test_collect_runs_rows_and_replace(tmp_path):
    """bench/collect_runs.py turns scored side-study runs into committed rows (lr and steps from each run's
    config), replaces a re-collected run's row, and refuses an unscored run with the command that scores it."""
    import json as _json

    from bidm.config import save_yaml
    from bidm.evaluate import write_metrics

    C = _bench_module("collect_runs")
    runs = []
    for lr, fid in ((5e-4, 190.0), (2e-3, 170.0)):
        run = tmp_path / f"bidm_lr{lr:g}"
        run.mkdir()
        cfg = load_config(None, ["binarize.method=bidm", f"train.lr={lr}", "train.steps=9", "train.seed=100"])
        save_yaml(cfg, run / "config.yaml")
        write_metrics([{"feature_space": "inception", "fid": fid, "sfid": 1.0, "precision": 0.5, "recall": 0.01,
                        "n_samples": 20, "n_reference": 40}], run)  # fmt: skip
        runs.append(run)
    out = tmp_path / "lr.json"
    C.main([str(r) for r in runs] + ["--out", str(out), "--note", "sweep"])
    C.main([str(runs[1]), "--out", str(out)])
    data = _json.loads(out.read_text())
    assert data["protocol"]["note"] == "sweep"
    assert [(r["lr"], r["steps"], r["seed"], r["fid"], r["n_ref"]) for r in data["rows"]] == [
        (5e-4, 9, 100, 190.0, 40), (2e-3, 9, 100, 170.0, 40)]  # fmt: skip
    assert all(r["config_hash"] and r["commit"] and r["machine"] for r in data["rows"])
    (runs[0] / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="bidm evaluate"):
        C.main([str(runs[0]), "--out", str(out)])
