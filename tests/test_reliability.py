"""Issue 14: no code execution from data, no silent data loss, one clear line for every bad input.

One section per class of the issue; each test failed before the mechanism it names existed.
"""

import errno
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY

from bidm import checkpoint, integrity
from bidm.cli import main
from bidm.commands.common import OutputConflict, check_outputs
from bidm.config import Config, from_dict, load_config, to_dict, updated
from bidm.errors import BidmError, CheckpointError, ConfigError, DataError, TrainingDiverged
from bidm.fileio import WriteError, atomic_write_text, remove_stale_temps
from bidm.lock import LOCK_NAME, RunLock, RunLocked
from bidm.train import EpsObjective, run, schedule, trim_log
from bidm.unet import DDIMUNet

SRC = Path(__file__).resolve().parents[1] / "src" / "bidm"
TINY = [
    *TINY,
    "train.batch_size=8",
    "train.log_every=1",
]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def images(n=16):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def train(tmp_path, steps=2, extra=(), resume=False, objective=None):
    cfg = load_config(None, TINY + [f"train.steps={steps}", "train.ckpt_every=2", *extra])
    torch.manual_seed(0)
    return run(cfg, DDIMUNet(cfg.model), objective or EpsObjective(schedule(cfg)), images(), out_dir=tmp_path,
               resume=resume)  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. no code execution from a dataset ---------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_batch(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "batch_label": "training batch",
        "labels": [int(v) for v in rng.integers(0, 10, n)],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "filenames": [b"x.png"] * n,
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_load_without_unpickling_code(tmp_path, protocol):
    from bidm.data import load_cifar10

    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(seed=i), protocol=protocol))
    x, y = load_cifar10(str(tmp_path))
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)


@pytest.mark.parametrize(
    "payload",
    [
        lambda m: {"data": _Exploit(m), "labels": []},
        lambda m: _Exploit(m),
        lambda m: {"data": np.array([_Exploit(m)], dtype=object), "labels": [0]},
    ],
)
def test_crafted_cifar_pickle_is_refused_and_runs_nothing(tmp_path, payload):
    from bidm.data import load_cifar10

    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload(marker)))
    with pytest.raises(DataError, match="not an official CIFAR-10 python batch|refusing"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()


def test_no_loader_unpickles():
    """Static guard: no pickle.load, no torch.load without weights_only=True, no np.load with pickles."""
    offenders = []
    for file in SRC.rglob("*.py"):
        text = file.read_text()
        for m in re.finditer(r"pickle\.loads?\(|torch\.load\([^)]*\)|np\.load\([^)]*\)", text, re.S):
            call = m.group(0)
            if call.startswith("pickle.load") or ("torch.load" in call and "weights_only=True" not in call):
                offenders.append(f"{file.name}: {call}")
            if call.startswith("np.load") and "allow_pickle=False" not in call:
                offenders.append(f"{file.name}: {call}")
    assert not offenders, offenders


# --- 2. no command writes over an input or an existing output without --force ------------------------------------


def test_check_outputs_rules(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(b"x")
    with pytest.raises(OutputConflict, match="input"):
        check_outputs([tmp_path / "." / "in.bin"], [src], force=True)  # never, not even with --force
    os.link(src, tmp_path / "hard.bin")
    with pytest.raises(OutputConflict, match="input"):
        check_outputs([tmp_path / "hard.bin"], [src], force=True)
    (tmp_path / "data").mkdir()
    with pytest.raises(OutputConflict, match="inside the input directory"):
        check_outputs([tmp_path / "data" / "x.png"], [tmp_path / "data"])
    with pytest.raises(OutputConflict, match="--force"):
        check_outputs([src], [])
    check_outputs([src], [None], force=True)
    check_outputs([tmp_path / "new.bin"], [src])


def _student_run(tmp_path, method="xnor"):
    from bidm.models import build_model

    cfg = from_dict(to_dict(load_config(None, TINY + [f"binarize.method={method}"])))
    state = build_model(cfg).state_dict()
    run_dir = tmp_path / "run"
    checkpoint.save(run_dir / checkpoint.CKPT_NAME, model=state, ema=state, config=to_dict(cfg), step=1)
    return run_dir


def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, capsys):
    run_dir = _student_run(tmp_path)
    ckpt = run_dir / checkpoint.CKPT_NAME
    before = sha(ckpt)
    for out in (ckpt, run_dir):
        assert main(["export", "--ckpt", str(run_dir), "--out", str(out), "--force"]) == 1
        assert "refusing to write" in capsys.readouterr().err
    assert sha(ckpt) == before
    packed = run_dir / "packed.safetensors"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(packed), "--no-check"]) == 0
    assert main(["export", "--ckpt", str(run_dir), "--out", str(packed), "--no-check"]) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(run_dir), "--out", str(packed), "--no-check", "--force"]) == 0


def test_binarize_refuses_a_teacher_directory_as_output(tmp_path, capsys):
    run_dir = _student_run(tmp_path)
    before = sha(run_dir / checkpoint.CKPT_NAME)
    argv = ["binarize", "--teacher", str(run_dir), "--method", "xnor", "--out", str(run_dir), "--resume"]
    assert main(argv) == 1
    assert "refusing to write" in capsys.readouterr().err
    assert sha(run_dir / checkpoint.CKPT_NAME) == before


# --- 3. non-finite weights are never saved; sampling fails loudly --------------------------------------------------


class PoisonWeights(EpsObjective):
    """A finite loss, then an inf weight (as after an update with a huge lr) from step 3 on."""

    def forward(self, model, x0, generator, shard=None):
        loss, logs = super().forward(model, x0, generator, shard)
        if self.step >= 3:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
        return loss, logs

    def before_step(self, model, step, total):
        self.step = step


def test_non_finite_weights_are_not_saved(tmp_path):
    cfg = load_config(None, TINY)
    with pytest.raises(TrainingDiverged, match="NaN/inf after step 4.*not saved"):
        train(tmp_path, steps=6, objective=PoisonWeights(schedule(cfg)))
    ck = checkpoint.load(tmp_path)
    assert ck.step == 2 and checkpoint.first_nonfinite(ck.model) is None
    with pytest.raises(CheckpointError, match="NaN/inf"):
        checkpoint.save(tmp_path / "x.safetensors", model={"w": torch.tensor([float("nan")])}, config={}, step=1)
    assert not (tmp_path / "x.safetensors").exists()


def test_sampling_non_finite_output_is_an_error(tmp_path):
    from bidm.sample import NonFiniteSamples, generate

    cfg = load_config(None, TINY)
    model = DDIMUNet(cfg.model)
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteSamples, match="conv_out.bias"):
        generate(model, cfg, n=2, steps=2, progress=False)

    class Overflow(torch.nn.Module):  # finite weights, infinite output
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x, t):
            return x * self.w * float("inf")

    with pytest.raises(NonFiniteSamples, match="NaN/inf values"):
        generate(Overflow(), cfg, n=2, steps=2, progress=False)


# --- 4. a run directory is locked -----------------------------------------------------------------------------------


def test_run_lock_names_holder_and_takes_over_stale_locks(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunLocked, match="in use"):
            train(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(f"{dead_pid()} host\n")  # a run killed with SIGKILL left its lock file
    train(tmp_path)
    assert checkpoint.load(tmp_path).step == 2 and not (tmp_path / LOCK_NAME).exists()


def test_second_process_is_refused(tmp_path):
    code = "import sys; from bidm.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('locked')"
    env = {**os.environ, "PYTHONPATH": str(SRC.parent)}
    with RunLock(tmp_path):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and f"PID {os.getpid()}" in proc.stderr


# --- 5. --resume with a changed config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, frozen",
    [("train.seed=1", "train.seed"), ("model.ch=64", "model.ch"), ("binarize.method=xnor", "binarize.method"),
     ("data.size=16", "data.size"), ("diffusion.beta_end=0.03", "diffusion.beta_end")],
)  # fmt: skip
def test_resume_refuses_frozen_changes(tmp_path, change, frozen):
    train(tmp_path)
    before = sha(tmp_path / checkpoint.CKPT_NAME)
    with pytest.raises(ConfigError, match=f"--resume cannot change {re.escape(frozen)}"):
        train(tmp_path, steps=4, extra=[change], resume=True)
    assert sha(tmp_path / checkpoint.CKPT_NAME) == before


def test_resume_applies_lr_and_says_so(tmp_path, capsys):
    train(tmp_path)
    train(tmp_path, steps=4, extra=["train.lr=1e-3"], resume=True)
    out = capsys.readouterr().out
    assert "train.lr: 0.0002 -> 0.001" in out and "param groups" in out and "train.steps: 2 -> 4" in out
    ck = checkpoint.load(tmp_path)
    assert ck.step == 4 and all(g["lr"] == 1e-3 for g in ck.optimizer["param_groups"])


# --- 6. numbers are validated with their range ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, match",
    [("train.steps=0", r"train.steps must be > 0, got 0"), ("train.batch_size=-4", r"batch_size must be > 0"),
     ("train.ckpt_every=0", r"ckpt_every must be > 0"), ("train.log_every=0", r"log_every must be > 0"),
     ("train.lr=0", r"train.lr must be > 0"), ("train.lr=.nan", "finite"), ("train.ema_decay=1", r"in \[0, 1\)"),
     ("sample.n=0", r"sample.n must be > 0"), ("sample.steps=-1", "sample.steps"), ("model.ch_mult=[1, 0]", "ch_mult"),
     ("diffusion.num_timesteps=0", "num_timesteps"), ("data.limit=0", "data.limit"), ("model.dropout=1.5", "dropout"),
     ("train.optimizer=sgd", r"one of \['adam', 'adamw'\]")],
)  # fmt: skip
def test_numeric_fields_are_validated_at_load(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_sample_arguments_do_not_fall_back_to_defaults():
    from bidm.sample import generate

    cfg = Config()
    with pytest.raises(ConfigError, match="sample.n must be > 0, got 0"):
        updated(cfg.sample, "sample", n=0)
    assert updated(cfg.sample, "sample", n=3, steps=None).n == 3
    for kwargs in ({"n": 0}, {"steps": 0}, {"batch_size": 0}, {"n": -3}):
        with pytest.raises(ConfigError):
            generate(torch.nn.Linear(1, 1), cfg, progress=False, **kwargs)


# --- 7. one line instead of a traceback ----------------------------------------------------------------------------


def _crafted(path, meta, tensors=None):
    save_file(tensors or {"model.w": torch.ones(2)}, str(path), metadata={"format": checkpoint.FORMAT, **meta})
    return path


@pytest.mark.parametrize(
    "meta, tensors, match",
    [({"step": "1", "config": "{bad"}, None, "not valid JSON"), ({"config": "{}"}, None, "no 'step'"),
     ({"step": "x", "config": "{}"}, None, "non-negative integer"), ({"step": "-1", "config": "{}"}, None, "integer"),
     ({"step": "1", "config": "[]"}, None, "JSON dict"), ({"step": "1"}, None, "no 'config'"),
     ({"step": "1", "config": "{}"}, {"evil.w": torch.ones(1)}, "unexpected tensor 'evil.w'"),
     ({"step": "1", "config": "{}"}, {"nodot": torch.ones(1)}, "unexpected tensor"),
     ({"step": "1", "config": "{}", "optim_groups": "[1]"}, None, "param groups"),
     ({"step": "1", "config": "{}", "optim_groups": "[]"}, {"optim.x.y": torch.ones(1)}, "optimizer tensor")],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:.*no content hash")
def test_crafted_checkpoint_metadata_is_a_clear_error(tmp_path, meta, tensors, match):
    path = _crafted(tmp_path / "c.safetensors", meta, tensors)
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(path)


@pytest.mark.filterwarnings("ignore:.*no content hash")
def test_packed_file_with_broken_json(tmp_path, capsys):
    from bidm.export.io import FORMAT, read_packed

    save_file({"x": torch.ones(1)}, str(tmp_path / "p.safetensors"), metadata={"format": FORMAT, "bidm": "{oops"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_packed(tmp_path / "p.safetensors")
    assert main(["sample", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid JSON" in err


def test_full_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    import bidm.export.io as io

    run_dir = _student_run(tmp_path)
    out = tmp_path / "p.safetensors"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out), "--no-check"]) == 0
    before = sha(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    assert main(["export", "--ckpt", str(run_dir), "--out", str(out), "--no-check", "--force"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert sha(out) == before and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    with pytest.raises(WriteError) as info:
        atomic_write_text(Path("/proc/bidm-cannot-write/x"), "x")
    assert isinstance(info.value, OSError) and isinstance(info.value, BidmError)


def test_evaluate_needs_two_images(tmp_path):
    from bidm.evaluate import evaluate_samples
    from bidm.npz_io import save_samples_npz

    path = save_samples_npz(tmp_path / "s.npz", np.zeros((1, 16, 16, 1), np.uint8))
    with pytest.raises(BidmError, match="1 samples, but scoring needs at least"):
        evaluate_samples(path, dataset="digits", feature_space="domain", progress=False)


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(CheckpointError):
        main(["--debug", "export", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "p.safetensors")])


# --- 8. integrity hashes ---------------------------------------------------------------------------------------------


def _flip_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) - len(data) // 3  # inside the tensor data, past the JSON header
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_flipped_checkpoint_or_packed_file_is_refused(tmp_path, capsys):
    run_dir = _student_run(tmp_path)
    packed = tmp_path / "p.safetensors"
    assert main(["export", "--ckpt", str(run_dir), "--out", str(packed), "--no-check"]) == 0
    _flip_middle(packed)
    _flip_middle(run_dir / checkpoint.CKPT_NAME)
    with pytest.raises(CheckpointError, match="integrity check"):
        checkpoint.load(run_dir)
    from bidm.export import read_packed

    with pytest.raises(CheckpointError, match="integrity check"):
        read_packed(packed)
    assert main(["sample", str(packed), "--n", "2", "--steps", "1", "--out", str(tmp_path / "o")]) == 1
    assert "integrity check" in capsys.readouterr().err
    with integrity.skip_verification():
        checkpoint.load(run_dir)
    assert main(["--no-verify", "sample", str(packed), "--n", "2", "--steps", "1", "--out", str(tmp_path / "o")]) in (
        0,
        1,  # the flipped weights may sample to NaN: that is then a NonFiniteSamples line, not an integrity one
    )
    assert "integrity" not in capsys.readouterr().err


def test_files_without_a_hash_still_load_with_a_warning(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file(
        {"model.w": torch.ones(2)}, str(path), metadata={"format": checkpoint.FORMAT, "step": "1", "config": "{}"}
    )
    with pytest.warns(UserWarning, match="no content hash"):
        assert checkpoint.load(path).step == 1
    meta = checkpoint.load(tmp_path / "old.safetensors").meta
    assert integrity.HASH_KEY not in meta


# --- 9. smaller ------------------------------------------------------------------------------------------------------


def test_evaluate_refuses_to_rescale_the_reference(tmp_path):
    from bidm.evaluate import _load_dataset, evaluate_samples
    from bidm.npz_io import save_samples_npz

    path = save_samples_npz(tmp_path / "s.npz", np.zeros((8, 32, 32, 1), np.uint8))
    with pytest.raises(BidmError, match="refusing to rescale the reference.*--ref-size 32"):
        evaluate_samples(path, dataset="digits", feature_space="domain", progress=False)
    (tmp_path / "config.yaml").write_text("data: {name: digits, size: 16}\n")  # the run trained at 16x16
    with pytest.raises(BidmError, match="'digits' reference is 16x16"):
        evaluate_samples(path, dataset="digits", feature_space="domain", progress=False)
    x, _ = _load_dataset("digits", path=None, split="train", size=32, channels=1, ref_size=32)  # explicit: allowed
    assert x.shape[-1] == 32


def test_stale_temp_files_are_removed_at_the_next_write(tmp_path):
    dead = tmp_path / f".checkpoint.safetensors.{dead_pid()}-abc123.tmp"
    live = tmp_path / f".checkpoint.safetensors.{os.getppid()}-abc123.tmp"
    legacy = tmp_path / ".checkpoint.safetensors.a1b2c3d4.tmp"
    for p in (dead, live, legacy):
        p.write_bytes(b"partial")
    os.utime(legacy, (0, 0))
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert not dead.exists() and not legacy.exists() and live.exists()
    assert remove_stale_temps(tmp_path) == []


def test_log_does_not_repeat_steps_after_resume(tmp_path):
    train(tmp_path, steps=2)
    with open(tmp_path / "log.jsonl", "a") as fh:  # a killed run logged steps 3-4 but never checkpointed them
        fh.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + '\n{"st')
    train(tmp_path, steps=4, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert trim_log('{"step": 1}\n{"step": 5}\nnot json\n', 2) == '{"step": 1}\n'


def test_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        run_dir = _student_run(tmp_path)
        atomic_write_text(tmp_path / "t.txt", "x")
        assert main(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "p.safetensors"), "--no-check"]) == 0
    finally:
        os.umask(old)
    for name in ("run/checkpoint.safetensors", "t.txt", "p.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --- 10. diffusers teachers ------------------------------------------------------------------------------------------


def test_diffusers_config_is_json(tmp_path):
    from diffusers import UNet2DModel

    from bidm.unet import DiffusersUNet

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 32),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(tmp_path)  # fmt: skip
    cfg = DiffusersUNet.from_pretrained(tmp_path).config
    assert json.loads(json.dumps(cfg.diffusers_config)) == cfg.diffusers_config
    assert not any(k.startswith("_") for k in cfg.diffusers_config)
