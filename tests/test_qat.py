"""The QAT pipeline end to end on a tiny teacher: every method trains a few steps, resumes exactly, and samples."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY as BASE
from tiny import save_random_teacher

from bidm import METHODS, checkpoint
from bidm.config import load_config
from bidm.models import load_model, load_teacher, student_from_teacher
from bidm.pipeline import student_config
from bidm.qat import RECIPES, binarized_layers, resolve_recipe, train_student
from bidm.sample import generate
from bidm.tbs import CrossTimestep

TINY = list(BASE)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random-init FP teacher saved as a bidm run (training it is not what these tests check)."""
    return save_random_teacher(tmp_path_factory.mktemp("teacher"), TINY[len(BASE) :])


def _student_cfg(teacher_dir, method, out, steps=2):
    return student_config(
        teacher_dir, method, out, [f"train.steps={steps}", "train.batch_size=8", "train.log_every=1",
                                   "train.ckpt_every=2", "data.limit=64", "sample.steps=3"],
    )  # fmt: skip


def test_student_starts_equal_to_teacher(teacher_dir):
    cfg = resolve_recipe(_student_cfg(teacher_dir, "bidm", teacher_dir / "unused"))
    teacher, _ = load_teacher(teacher_dir, cfg.model)
    student = student_from_teacher(teacher, cfg)
    assert isinstance(student, CrossTimestep)
    fp = teacher.state_dict()
    latent = {k.removeprefix("unet."): v for k, v in student.state_dict().items()}
    layers = binarized_layers(student)
    assert layers, "nothing was binarized"
    for name, value in fp.items():
        if name.endswith("weight") and name in latent:
            assert torch.equal(latent[name], value), name
    assert all(not p.requires_grad for p in teacher.parameters())


def test_recipes_fill_only_auto_values(teacher_dir):
    cfg = resolve_recipe(_student_cfg(teacher_dir, "bidm", teacher_dir / "x"))
    assert cfg.binarize.feature_loss == "spd" and cfg.binarize.output_kd == 0.0
    cfg = resolve_recipe(_student_cfg(teacher_dir, "reactnet", teacher_dir / "x"))
    assert cfg.binarize.output_kd == RECIPES["reactnet"]["output_kd"] and cfg.binarize.feature_loss == "none"
    explicit = load_config(None, ["binarize.method=xnor", "binarize.feature_loss=l2", "binarize.output_kd=0.5"])
    assert (
        resolve_recipe(explicit).binarize.feature_loss == "l2" and resolve_recipe(explicit).binarize.output_kd == 0.5
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_samples(teacher_dir, tmp_path, method):
    path = train_student(_student_cfg(teacher_dir, method, tmp_path / method))
    ck = checkpoint.load(path)
    assert ck.step == 2 and ck.config["binarize"]["method"] == method
    logs = [line for line in (tmp_path / method / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all("flip_ratio" in line for line in logs)
    model, cfg = load_model(tmp_path / method)
    images = generate(model, cfg, n=3, batch_size=3, steps=3, progress=False)
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8


def test_bidm_student_resumes_exactly(teacher_dir, tmp_path):
    train_student(_student_cfg(teacher_dir, "bidm", tmp_path / "full", steps=4))
    part = _student_cfg(teacher_dir, "bidm", tmp_path / "part", steps=2)
    train_student(part)
    train_student(_student_cfg(teacher_dir, "bidm", tmp_path / "part", steps=4), resume=True)
    a = load_file(tmp_path / "full" / checkpoint.CKPT_NAME)
    b = load_file(tmp_path / "part" / checkpoint.CKPT_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
