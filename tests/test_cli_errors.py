"""Every `bidm` subcommand with bad arguments: one line on stderr, a non-zero exit, and no input file changed.

The inputs (a teacher run, a student run with samples and metrics, a packed export, configs and crafted files)
are built once; every case hashes all of them before and after. ``{T}`` is the teacher run, ``{S}`` the student
run, ``{P}`` its packed file, ``{F}`` the fixture folder and ``{N}`` a fresh folder for outputs.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY

from bidm import checkpoint
from bidm.cli import main
from bidm.config import load_config, save_yaml, to_dict
from bidm.npz_io import save_samples_npz

SETS = [arg for o in TINY for arg in ("--set", o)]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    from bidm.models import build_model

    root = tmp_path_factory.mktemp("inputs")
    for name, method in (("teacher", "none"), ("student", "xnor")):
        cfg = load_config(None, TINY + [f"binarize.method={method}", f"out_dir={root / name}"])
        model = build_model(cfg)
        opt = torch.optim.Adam(model.parameters())
        state = model.state_dict()
        checkpoint.save(root / name / checkpoint.CKPT_NAME, model=state, ema=state, optimizer=opt.state_dict(),
                        config=to_dict(cfg), step=1)  # fmt: skip
        save_yaml(cfg, root / name / "config.yaml")
    assert main(["export", "--ckpt", str(root / "student"), "--out", str(root / "packed.safetensors")]) == 0
    rng = np.random.default_rng(0)
    save_samples_npz(root / "student" / "samples.npz", rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    save_samples_npz(root / "one.npz", rng.integers(0, 256, (1, 16, 16, 1), dtype=np.uint8))
    save_samples_npz(root / "eight.npz", rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))  # no run config
    (root / "student" / "samples.png").write_bytes(b"an earlier grid")
    (root / "student" / "metrics.json").write_text(json.dumps({"fid": 1.0, "feature_space": "domain"}))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text("{not json")
    (root / "runs.yaml").write_text("runs: [a, b\n")
    (root / "c.yaml").write_text("train: {steps: 3}\n")
    (root / "summary.json").write_text("{}\n")
    save_file(
        {"x": torch.zeros(1)}, str(root / "badjson.safetensors"), metadata={"format": "bidm-packed", "bidm": "{"}
    )
    save_file({"model.w": torch.zeros(1)}, str(root / "badstep.safetensors"),
              metadata={"format": checkpoint.FORMAT, "step": "one", "config": "{}"})  # fmt: skip
    from bidm import integrity

    cfg = load_config(None, TINY)
    state = {f"model.{k}": v.clone() for k, v in build_model(cfg).state_dict().items()}
    state["model.conv_out.bias"].fill_(float("nan"))  # a diverged checkpoint, as bidm < issue 14 could save
    meta = {"format": checkpoint.FORMAT, "step": "1", "config": json.dumps(to_dict(cfg))}
    save_file(state, str(root / "nan.safetensors"), metadata=integrity.with_digest(state, meta))
    (root / "demo").mkdir()
    (root / "demo" / "report.md").write_text("# an earlier report\n")
    return root


CASES = [
    # top level
    (["nosuchcommand"], "invalid choice"),
    (["sample"], "required"),
    # train
    (["train", "--set", "train.steps=0", "--out", "{N}"], "train.steps must be > 0"),
    (["train", "--set", "train.batch_size=0", "--out", "{N}"], "train.batch_size must be > 0"),
    (["train", "--set", "train.ckpt_every=0", "--out", "{N}"], "ckpt_every must be > 0"),
    (["train", "--set", "train.lr=-1", "--out", "{N}"], "train.lr must be > 0"),
    (["train", "--set", "train.bogus=1", "--out", "{N}"], "unknown config key"),
    (["train", "--config", "{F}/missing.yaml", "--out", "{N}"], "not found"),
    (["train", "--out", "{T}", *SETS], "--resume"),
    (["train", "--out", "{T}", "--resume", *SETS, "--set", "train.seed=5"], "cannot change train.seed"),
    (["train", "--out", "{T}", "--resume", *SETS, "--set", "model.ch=64"], "cannot change model.ch"),
    (["train", "--out", "{T}/sub", "--data-path", "{T}", "--set", "data.name=folder"], "inside the input directory"),
    # binarize
    (["binarize", "--method", "xnor", "--out", "{N}"], "no teacher"),
    (["binarize", "--teacher", "{F}/missing", "--method", "xnor", "--out", "{N}"], "not found"),
    (["binarize", "--teacher", "{T}", "--method", "xnor", "--out", "{T}", "--resume"], "refusing to write"),
    (["binarize", "--teacher", "{S}", "--method", "xnor", "--out", "{N}"], "not an FP teacher"),
    (["binarize", "--teacher", "{T}", "--method", "nope", "--out", "{N}"], "unknown binarization method"),
    (["binarize", "--teacher", "{T}", "--method", "xnor", "--out", "{N}", "--set", "train.steps=-5"], "train.steps"),
    # sample
    (["sample", "{S}", "--n", "0", "--out", "{N}"], "argument --n/--num-samples: must be an integer >= 1"),
    (["sample", "{S}", "--n", "-3", "--out", "{N}"], "argument --n"),
    (["sample", "{S}", "--steps", "0", "--out", "{N}"], "argument --steps"),
    (["sample", "{S}", "--batch-size", "0", "--out", "{N}"], "argument --batch-size"),
    (["sample", "{S}", "--eta", "nan", "--out", "{N}"], "argument --eta"),
    (["sample", "{S}"], "exists: pass --force"),
    (["sample", "{F}/missing", "--out", "{N}"], "no checkpoint"),
    (["sample", "{F}/badjson.safetensors", "--out", "{N}"], "not valid JSON"),
    (["sample", "{F}/badstep.safetensors", "--out", "{N}"], "'step'"),
    (["sample", "{F}/nan.safetensors", "--out", "{N}"], "holds NaN/inf"),
    (["sample", "{S}", "--n", "1", "--steps", "1", "--out", "{S}/checkpoint.safetensors"], "cannot write"),
    # summary
    (["summary", "--input-shape", "1,2"], "--input-shape"),
    (["summary", "--model", "tiny", "--out", "{F}/summary.json"], "exists: pass --force"),
    (["summary", "--config", "{F}/c.yaml", "--out", "{F}/c.yaml", "--force"], "input"),
    (["summary", "--config", "{F}/c.yaml", "--set", "model.ch=0"], "model.ch must be > 0"),
    # export
    (["export", "--ckpt", "{S}", "--out", "{S}/checkpoint.safetensors"], "refusing to write"),
    (["export", "--ckpt", "{S}", "--out", "{S}/checkpoint.safetensors", "--force"], "refusing to write"),
    (["export", "--ckpt", "{S}", "--out", "{F}/packed.safetensors"], "exists: pass --force"),
    (["export", "--ckpt", "{T}", "--out", "{N}/p.safetensors"], "full-precision"),
    (["export", "--ckpt", "{S}"], "required"),
    # evaluate
    (["evaluate", "--samples", "{F}/missing.npz", "--dataset", "digits", "--out", "{N}"], "not found"),
    (
        ["evaluate", "--samples", "{F}/one.npz", "--dataset", "digits", "--features", "domain", "--out", "{N}"],
        "at least",
    ),  # fmt: skip
    (
        ["evaluate", "--samples", "{F}/eight.npz", "--dataset", "digits", "--features", "domain", "--out", "{N}"],
        "refusing to rescale",
    ),  # fmt: skip
    (["evaluate", "--samples", "{S}/samples.npz", "--dataset", "digits"], "exists: pass --force"),
    (["evaluate", "--samples", "{S}/samples.npz", "--dataset", "digits", "--n", "0"], "argument --n"),
    (["evaluate", "--samples", "{S}/samples.npz", "--dataset", "digits", "--features", "clip"], "invalid choice"),
    (
        ["evaluate", "--samples", "{F}/one.npz", "--dataset", "nope", "--features", "domain", "--out", "{N}"],
        "at least",
    ),  # fmt: skip
    # compare
    (["compare", "{T}", "--out", "{N}"], "metrics.json not found"),
    (["compare", "{S}"], "needs --out"),
    (["compare", "{S}", "--out", "{N}", "--n-images", "0"], "argument --n-images"),
    (["compare", "{F}/broken", "--out", "{N}"], "not valid JSON"),
    (["compare", "{F}/runs.yaml", "--out", "{N}"], "not valid YAML"),
    (["compare", "{S}", "--out", "{S}"], "exists: pass --force"),
    # demo
    (["demo", "--out", "{N}", "--n-samples", "1"], "--n-samples must be >= 2"),
    (["demo", "--out", "{N}", "--methods", "nope"], "unknown"),
    (["demo", "--out", "{N}", "--teacher-steps", "0"], "argument --teacher-steps"),
    (["demo", "--out", "{F}/demo"], "exists: pass --force"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_bad_arguments_give_one_line_and_change_nothing(fixture_dir, tmp_path, capsys, argv, expected):
    names = {"{T}": fixture_dir / "teacher", "{S}": fixture_dir / "student", "{P}": fixture_dir / "packed.safetensors",
             "{F}": fixture_dir, "{N}": tmp_path / "new"}  # fmt: skip
    resolved = []
    for arg in argv:
        for key, value in names.items():
            arg = arg.replace(key, str(value))
        resolved.append(arg)
    before = snapshot(fixture_dir)
    capsys.readouterr()
    code = main(resolved)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bidm") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    after = snapshot(fixture_dir)
    assert {k: v for k, v in after.items() if k in before} == before, "an input file changed"
