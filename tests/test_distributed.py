"""Data parallel for real: 2 ranks (torchrun, gloo, a real process group) against 1 process with the same global
batch and seed, through the CLI: training a teacher, a BiDM student (TBS + SPD), resuming a 2-rank checkpoint on
1 process, and sampling."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny import TINY_MODEL

from bidm import checkpoint
from bidm.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

DATA = ["data.name=digits", "data.size=8", "data.channels=1"]
# 15 rows: the ranks own 8 and 7 of them, so the unequal-shard weighting is exercised too
TRAIN = ["train.batch_size=15", "train.log_every=1", "train.lr=2e-3"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bidm.cli"]
    res = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def relative_gap(run_a, run_b, w0):
    """||w_a - w_b|| / ||w_a - w0|| over the float weights."""
    a, b = checkpoint.load(run_a).model, checkpoint.load(run_b).model
    keys = [k for k in a if a[k].dtype.is_floating_point]
    gap = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys) ** 0.5
    moved = sum(((a[k] - w0[k]).double() ** 2).sum() for k in keys) ** 0.5
    assert moved > 0
    print(f"relative gap {run_a.name} vs {run_b.name}: {float(gap / moved):.2e}")  # shown with pytest -s
    return float(gap / moved)


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    args = ["--out", None, *sets([*DATA, *TINY_MODEL, *TRAIN, "train.steps=5", "train.ckpt_every=5"])]
    one, two = root / "teacher1", root / "teacher2"
    assert main(["train", *[str(one) if a is None else a for a in args]]) == 0
    out = torchrun("train", *[str(two) if a is None else a for a in args])
    assert out.count("checkpoint:") == 1  # printed (and written) once
    return root, one, two


def test_two_ranks_train_the_teacher_like_one_process(teachers):
    from bidm.config import from_dict
    from bidm.unet import build_unet

    _, one, two = teachers
    cfg = from_dict(checkpoint.load(one).config)
    torch.manual_seed(cfg.train.seed)
    w0 = build_unet(cfg.model).state_dict()
    assert relative_gap(one, two, w0) < 1e-2
    # the logged loss is the global-batch mean, not rank 0's
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-4)
    assert checkpoint.load(two).step == 5 and len(losses(two)) == 5


def student_init(run):
    from bidm.config import from_dict
    from bidm.models import load_teacher, student_from_teacher
    from bidm.qat import resolve_recipe

    cfg = resolve_recipe(from_dict(checkpoint.load(run).config))
    teacher, model_cfg = load_teacher(cfg.binarize.teacher, cfg.model)
    torch.manual_seed(cfg.train.seed)
    return student_from_teacher(teacher, dataclasses.replace(cfg, model=model_cfg)).state_dict()


def test_two_ranks_train_a_bidm_student_like_one_process_and_resume_on_one(teachers):
    root, teacher, _ = teachers
    common = ["--teacher", str(teacher), "--method", "bidm"]
    opts = [*DATA, *TRAIN, "train.ckpt_every=1", "binarize.tbs_blocks=2", "binarize.train_cache_noise=forward"]
    two, one2, one3 = root / "bidm2", root / "bidm1_2steps", root / "bidm1_3steps"
    torchrun("binarize", *common, "--out", str(two), *sets([*opts, "train.steps=2"]))
    assert main(["binarize", *common, "--out", str(one2), *sets([*opts, "train.steps=2"])]) == 0
    assert main(["binarize", *common, "--out", str(one3), *sets([*opts, "train.steps=3"])]) == 0
    w0 = student_init(one2)
    assert relative_gap(one2, two, w0) < 1e-2
    np.testing.assert_allclose(losses(two), losses(one2), rtol=1e-4)  # incl. the SPD term over the global batch
    # the 2-rank checkpoint goes on for one more step on 1 process, as if it had been one process all along
    assert main(["binarize", *common, "--out", str(two), "--resume", *sets([*opts, "train.steps=3"])]) == 0
    assert checkpoint.load(two).step == 3
    assert relative_gap(one3, two, w0) < 1e-2


def test_two_ranks_sample_exactly_the_images_of_one_process(teachers):
    root, teacher, _ = teachers
    args = [str(teacher), "--num-samples", "7", "--batch-size", "2", "--steps", "4", "--eta", "1"]
    assert main(["sample", *args, "--out", str(root / "s1")]) == 0
    out = torchrun("sample", *args, "--out", str(root / "s2"))
    assert "7 samples (2 processes)" in out
    a, b = (np.load(root / d / "samples.npz")["arr_0"] for d in ("s1", "s2"))
    assert a.shape == (7, 8, 8, 1)
    np.testing.assert_array_equal(a, b)
