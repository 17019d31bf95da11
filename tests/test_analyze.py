"""`bidm analyze`: its statistics on toy models where the answer is known, and one CLI run on a tiny BiDM student."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from tiny import TINY as BASE
from tiny import save_random_teacher

from bidm import cli
from bidm.analyze import joint_name, layer_groups, read_log, shared_inputs
from bidm.diffusion import alphas_cumprod, make_betas
from bidm.models import load_teacher, student_from_teacher
from bidm.observe import (
    cosine_matrix,
    default_lags,
    feature_distances,
    lag_similarity,
    percentiles,
    range_stats,
    range_variation,
    record_trajectory,
)
from bidm.pipeline import student_config
from bidm.qat import resolve_recipe, train_student
from bidm.weight_stats import alpha_table, flip_fraction, layer_diagnostics

TINY = [*BASE, "model.attn_resolutions=[]", "sample.steps=4"]
ACP = alphas_cumprod(make_betas("linear", 1000)).float()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random-init FP teacher saved as a bidm run (what it learned does not matter here)."""
    return save_random_teacher(tmp_path_factory.mktemp("teacher"), TINY[len(BASE) :])


def _student_cfg(teacher_dir, out, steps=3):
    return student_config(
        teacher_dir, "bidm", out, [f"train.steps={steps}", "train.batch_size=8", "train.log_every=1",
                                   "train.ckpt_every=3", "data.limit=32", "binarize.tbs_blocks=2"],
    )  # fmt: skip


class ToyUNet(nn.Module):
    """eps = conv(x); block "const" ignores its input (same output at every step), block "ident" returns x."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.const = nn.Identity()
        self.ident = nn.Identity()
        self.value = nn.Parameter(torch.randn(1, 1, 4, 4))

    def forward(self, x, t):
        self.const(self.value.expand(x.shape[0], -1, -1, -1))
        self.ident(x)
        return 0.1 * self.conv(x)

    def feature_blocks(self):
        return ["const", "ident"]

    def num_output_blocks(self):
        return 2


# ---------------------------------------------------------------------------------------------- statistics


def test_percentiles_of_a_known_tensor():
    x = torch.arange(101.0).reshape(1, 101)  # 0..100: the q-th percentile is 100 q
    assert percentiles(x, (0.0, 0.01, 0.5, 0.99, 1.0)) == pytest.approx([0, 1, 50, 99, 100])
    y = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(1))
    stats = range_stats(y)
    expected = np.percentile(y.numpy(), [0, 1, 99, 100])
    assert [stats[k] for k in ("min", "p01", "p99", "max")] == pytest.approx(expected.tolist(), abs=1e-6)
    assert range_variation([0.0, -1.0], [1.0, 1.0]) == 2.0  # widths 1 and 2
    assert range_variation([0.0, 0.0], [1.0, 1.0]) == 1.0


def test_similarity_of_constant_and_alternating_features():
    const = torch.randn(1, 3, 10).expand(6, 3, 10)  # [S, n, D]: the same output at every step
    assert torch.allclose(cosine_matrix(const), torch.ones(6, 6, dtype=torch.float64))
    e1, e2 = torch.eye(2)
    alternating = torch.stack([e1, e2] * 3)[:, None, :]  # steps alternate between orthogonal outputs
    sims = lag_similarity(cosine_matrix(alternating), [1, 2, 5, 10])
    assert sims == pytest.approx({1: 0.0, 2: 1.0, 5: 0.0})  # lag 10 >= 6 steps is left out
    assert default_lags(50) == [1, 2, 5, 10, 20] and default_lags(3) == [1, 2]


def test_trajectory_block_constant_across_timesteps_has_similarity_one():
    model = ToyUNet()
    x_T = torch.randn(3, 1, 4, 4)
    traj = record_trajectory(model, x_T, ACP, layers=["conv"], steps=5, sim_batch=2)
    assert traj["t"] == [800, 600, 400, 200, 0] and traj["features"]["const"].shape == (5, 2, 16)
    assert torch.allclose(cosine_matrix(traj["features"]["const"]), torch.ones(5, 5, dtype=torch.float64))
    assert cosine_matrix(traj["features"]["ident"])[0, -1] < 0.999  # x_t does change
    first = {k: v[0] for k, v in traj["ranges"]["conv"].items()}
    assert first == pytest.approx(range_stats(x_T))  # the conv's input at the first step is x_T
    assert traj["shapes"]["conv"] == [1, 4, 4]
    assert not model.conv._forward_pre_hooks and not model.const._forward_hooks  # hooks removed
    only = record_trajectory(model, x_T, ACP, layers=[], steps=2, blocks=["ident"])
    assert set(only["features"]) == {"ident"} and only["ranges"] == {}


# ---------------------------------------------------------------------------------------------- student vs teacher


def test_identity_student_has_zero_l2_and_spd_distance(teacher_dir):
    teacher, _ = load_teacher(teacher_dir, None)
    x_T = torch.randn(2, 1, 8, 8)
    same = feature_distances(copy.deepcopy(teacher), teacher, x_T, ACP, steps=3)
    assert same["t"] == [666, 333, 0] and same["blocks"] == teacher.feature_blocks()
    assert all(v == 0.0 for key in ("l2", "spd") for values in same[key].values() for v in values)
    noisy = copy.deepcopy(teacher)
    with torch.no_grad():
        noisy.conv_in.weight.add_(0.1)
    diff = feature_distances(noisy, teacher, x_T, ACP, steps=3)
    assert all(v > 0 for key in ("l2", "spd") for v in diff[key]["conv_in"])


def test_weights_equal_to_teacher_have_no_flips(teacher_dir, tmp_path):
    cfg = resolve_recipe(_student_cfg(teacher_dir, tmp_path))
    teacher, _ = load_teacher(teacher_dir, cfg.model)
    student = student_from_teacher(teacher, cfg)  # latent weights = the teacher's
    rows = layer_diagnostics(student, teacher)
    assert rows and all(r["flip_fraction"] == 0.0 for r in rows)
    assert all(r["mean_abs"] == pytest.approx(r["teacher_mean_abs"]) for r in rows)
    convs = [r for r in rows if r["kind"] == "conv"]
    assert convs and all(r["k_conv"]["ratio"] == pytest.approx([1.0] * len(r["k_conv"]["ratio"])) for r in convs)
    assert all(r["thresholds"]["max"] == r["thresholds"]["min"] == 0.0 for r in rows)  # init 0
    layer = student.unet.get_submodule(rows[0]["name"])
    with torch.no_grad():
        layer.weight.view(-1)[0].mul_(-1)  # flip one sign
    assert layer_diagnostics(student, teacher)[0]["flip_fraction"] == pytest.approx(1 / layer.weight.numel())
    assert flip_fraction(torch.tensor([1.0, -1.0, 0.0]), torch.tensor([2.0, 3.0, 4.0])) == pytest.approx(1 / 3)
    table = alpha_table(student)
    assert np.asarray(table["alpha"]).shape == (100, 2) and table["min"] == table["max"] == pytest.approx(0.3)


def test_read_log_keeps_nonzero_keys_and_layer_groups(tmp_path):
    lines = [
        {"step": 1, "loss": 2.0, "kd": 0.0, "flip_ratio": 0.0},
        {"step": 2, "loss": 1.0, "kd": 0.0, "flip_ratio": 0.1},
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = read_log(tmp_path)
    assert log == {"loss": {"step": [1, 2], "value": [2.0, 1.0]}, "flip_ratio": {"step": [1, 2], "value": [0.0, 0.1]}}
    assert read_log(tmp_path / "missing") == {}
    shapes = {"down.0.a.conv": [4, 8, 8], "down.0.d.conv": [4, 9, 9], "down.1.a": [4, 4, 4], "mid.x.q": [8, 4, 4]}
    assert layer_groups(shapes) == {
        "down.0 (inputs 8x8, 9x9)": ["down.0.a.conv", "down.0.d.conv"],
        "down.1 (inputs 4x4)": ["down.1.a"],
        "mid (inputs 4x4)": ["mid.x.q"],
    }
    same, other = {"min": [0.0], "max": [1.0]}, {"min": [0.0], "max": [2.0]}
    assert shared_inputs({"a.q": same, "a.k": same, "b": other, "a.v": same}) == [["a.q", "a.k", "a.v"], ["b"]]
    assert joint_name(["up.1.attn.0.q", "up.1.attn.0.k", "up.1.attn.0.v"]) == "up.1.attn.0.{q,k,v}"
    assert joint_name(["x"]) == "x" and joint_name(["p", "q"]) == "p, q"


# ---------------------------------------------------------------------------------------------- CLI end to end


def test_cli_analyze_student_and_fp_run(teacher_dir, tmp_path):
    student_dir = tmp_path / "bidm"
    train_student(_student_cfg(teacher_dir, student_dir))
    out = tmp_path / "analysis"
    assert cli.main(["analyze", "--ckpt", str(student_dir), "--out", str(out), "--n", "4", "--n-eps", "8"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert set(result) >= {"obs1a", "obs1b", "obs2", "eps", "binarization", "summary", "settings"}
    assert result["obs1a"]["student"]["t"] == [750, 500, 250, 0]  # sample.steps = 4 of the run
    assert result["summary"]["flip_fraction"] >= 0 and len(result["eps"]["train"]) == 20
    names = {p.split("/")[-1] for p in result["files"]["figures"]}
    assert {"samples.png", "obs1a_ranges_0.png", "obs1b_sim_student.png", "obs1b_sim_teacher.png", "obs1b_lags.png",
            "obs2_feature_distance.png", "obs2_training_log.png", "eps_error.png", "bin_weights.png",
            "bin_thresholds.png", "bin_kconv.png", "tbs_alpha.png"} <= names  # fmt: skip
    index = (out / "index.md").read_text()
    for name in names:
        assert (out / name).stat().st_size > 1000 and f"]({name})" in index

    fp_out = tmp_path / "fp"
    assert cli.main(["analyze", "--ckpt", str(teacher_dir), "--out", str(fp_out), "--n", "2"]) == 0
    fp = json.loads((fp_out / "analysis.json").read_text())
    assert set(fp["obs1a"]) == {"model"} and "obs2" not in fp and "binarization" not in fp
    assert cli.main(["analyze", "--ckpt", str(teacher_dir), "--teacher", str(teacher_dir), "--out", str(fp_out)]) == 1
