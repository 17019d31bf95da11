import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY as BASE

from bidm import checkpoint
from bidm.config import load_config
from bidm.errors import CheckpointError, TrainingDiverged
from bidm.train import BatchOrder, EpsObjective, run, schedule
from bidm.unet import DDIMUNet

TINY = [*BASE, "model.dropout=0.1", "train.batch_size=16", "train.log_every=2"]


def _train_cmd(out, steps, resume=False):
    cmd = [
        sys.executable,
        "-m",
        "bidm.cli",
        "train",
        "--out",
        str(out),
        "--set",
        f"train.steps={steps}",
        "--set",
        "train.ckpt_every=3",
    ]
    for o in TINY:
        cmd += ["--set", o]
    return cmd + (["--resume"] if resume else [])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    steps = 12
    subprocess.run(_train_cmd(tmp_path / "full", steps), check=True, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(killed, steps), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / checkpoint.CKPT_NAME
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = checkpoint.load(killed).step
    assert 0 < step_at_kill < steps, "the kill should land mid-run"

    subprocess.run(_train_cmd(killed, steps, resume=True), check=True, env=_env(), capture_output=True)
    a, b = load_file(tmp_path / "full" / checkpoint.CKPT_NAME), load_file(ckpt)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert checkpoint.load(ckpt).step == steps


def test_existing_run_needs_resume(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=1"])
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    run(cfg, DDIMUNet(cfg.model), EpsObjective(schedule(cfg)), images, out_dir=tmp_path)
    with pytest.raises(ValueError, match="--resume"):
        run(cfg, DDIMUNet(cfg.model), EpsObjective(schedule(cfg)), images, out_dir=tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = load_config(None, TINY + ["train.steps=6", "train.ckpt_every=3"])
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    model = DDIMUNet(cfg.model)

    class PoisonAfter(EpsObjective):
        def forward(self, model, x0, generator, shard=None):
            loss, logs = super().forward(model, x0, generator, shard)
            return (loss * float("nan") if self.calls >= 4 else loss), logs

        def before_step(self, model, step, total):
            self.calls = step

    with pytest.raises(TrainingDiverged, match="step 4"):
        run(cfg, model, PoisonAfter(schedule(cfg)), images, out_dir=tmp_path)
    assert checkpoint.load(tmp_path).step == 3


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, model={"w": torch.ones(2)}, config={"a": 1}, step=1)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(path, model={"w": torch.zeros(2)}, config={"a": 1}, step=2)
    assert checkpoint.load(path).step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left behind


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ck.safetensors"
    checkpoint.save(path, model={"w": torch.ones(1000)}, config={}, step=1)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a bidm checkpoint"):
        checkpoint.load(tmp_path / "other.safetensors")


def test_optimizer_state_round_trips(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    checkpoint.save(
        tmp_path / "c.safetensors", model=model.state_dict(), optimizer=opt.state_dict(), config={}, step=1
    )
    restored = torch.optim.Adam(model.parameters(), lr=1e-3)
    restored.load_state_dict(checkpoint.load(tmp_path / "c.safetensors").optimizer)
    for a, b in zip(opt.state.values(), restored.state.values()):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))


def test_batch_order_is_a_function_of_step():
    order = BatchOrder(10, 3, seed=1)
    first = [order.indices(s).tolist() for s in range(6)]
    again = BatchOrder(10, 3, seed=1)
    assert [again.indices(s).tolist() for s in (5, 0, 3)] == [first[5], first[0], first[3]]
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # no repeats inside an epoch


def test_ema_follows_the_model_to_its_device():
    import torch.nn as nn

    from bidm.train import EMA

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.9)
    model.to("meta")  # stands in for a CUDA device where none exists
    ema.follow(model)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}


def test_student_ema_optimizer_and_tbs_tensors_all_follow_a_non_cpu_device():
    """The `meta` device stands in for CUDA: nothing of a BiDM student's training state may stay on the CPU."""
    from bidm.models import student_from_teacher
    from bidm.tbs import CrossTimestep
    from bidm.train import EMA, make_optimizer

    cfg = load_config(None, [*BASE, "binarize.method=bidm", "binarize.tbs_blocks=2"])
    torch.manual_seed(0)
    student = student_from_teacher(DDIMUNet(cfg.model), cfg)
    assert isinstance(student, CrossTimestep)
    ema = EMA(student, 0.999)  # built on the CPU, as `run` does before `accelerator.prepare`
    cpu_opt = make_optimizer(cfg, [p for p in student.parameters() if p.requires_grad])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    student(x, t).square().mean().backward()
    cpu_opt.step()
    saved = cpu_opt.state_dict()  # what a checkpoint holds

    student.to("meta")
    ema.follow(student)
    opt = make_optimizer(cfg, [p for p in student.parameters() if p.requires_grad])
    opt.load_state_dict(saved)  # the resume path
    x, t = x.to("meta"), t.to("meta")
    cache = student.cache_pass(x, t)  # TBS training cache, then the mixed pass
    out = student(x, t, cache=cache)
    tensors = {
        **{f"ema.{k}": v for k, v in ema.shadow.items()},
        **{f"opt.{i}.{k}": v for i, s in enumerate(opt.state.values()) for k, v in s.items() if torch.is_tensor(v)},
        **{f"model.{k}": v for k, v in student.state_dict().items()},
        **{f"cache.{k}": v for k, v in {**cache, **student.last_cache()}.items()},
        "out": out,
    }
    left = sorted(
        k for k, v in tensors.items() if v.device.type != "meta" and not (k.endswith(".step") and v.dim() == 0)
    )
    assert len(opt.state) > 0 and len(cache) > 0
    assert left == [], left
