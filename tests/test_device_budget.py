"""bench/device_budget.py: pack the data, train + sample (the device half, here on the CPU), bundle, then score the
bundles here; the round trip keeps the samples, checks config hashes and refuses foreign tars."""

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tiny import save_random_teacher

from bidm import checkpoint
from bidm.data import load_dataset
from bidm.evaluate import write_metrics
from bidm.npz_io import uint8_to_images

ROOT = Path(__file__).resolve().parents[1]
SIZE16 = ["data.size=16", "model.resolution=16", "model.attn_resolutions=[8]", "model.in_channels=3",
          "model.out_ch=3"]  # fmt: skip


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("device_budget", ROOT / "bench" / "device_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(tmp_path, monkeypatch):
    D = _module()
    proto = D.P.PROTOCOLS["cifar16-v3"]
    for key, value in (("n_samples", 4), ("sample_steps", 2), ("n_ref", 6)):
        monkeypatch.setitem(proto, key, value)
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    rng = np.random.default_rng(0)
    np.savez(cifar / "train.npz", images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(6) % 2)  # fmt: skip
    teacher = save_random_teacher(tmp_path / "teacher", SIZE16)
    common = ["--teacher", str(teacher), "--data-path", str(cifar)]
    return D, tmp_path, common


def _train(D, tmp_path, common, methods="xnor,bidm"):
    data = tmp_path / "carry" / "train16.npz"
    D.main(["pack-data", "--out", str(data), *common])
    bundle = tmp_path / "OUT"
    rc = D.main(["train", "--data", str(data), "--methods", methods, "--seeds", "1", "--commit", "abc123",
                 "--work", str(tmp_path / "work"), "--bundle", str(bundle), *common,
                 "--set", "train.steps=2", "--set", "train.batch_size=2", "--set", "train.log_every=1",
                 "--set", "train.ckpt_every=2", "--set", "model.dropout=0.0"])  # fmt: skip
    assert rc == 0
    return data, bundle


def test_pack_data_is_the_protocol_loader_rounded_to_uint8(setup):
    D, tmp_path, common = setup
    out = tmp_path / "train16.npz"
    D.main(["pack-data", "--out", str(out), *common])
    packed = np.load(out)["images"]
    assert packed.dtype == np.uint8 and packed.shape == (6, 16, 16, 3)
    reference, _ = load_dataset("cifar10", path=common[3], split="train", size=16, channels=3)
    assert (uint8_to_images(packed) - reference).abs().max() <= 1 / 127.5 / 2 + 1e-6


def test_train_bundle_score_round_trip_and_refusals(setup, monkeypatch):
    D, tmp_path, common = setup
    _, bundle = _train(D, tmp_path, common)
    tars = sorted(bundle.glob("*.tar"))
    assert [t.name for t in tars] == ["bidm_s1.tar", "xnor_s1.tar"]
    assert all(t.stat().st_size < D.MAX_FILE_BYTES for t in tars)
    work = tmp_path / "work" / "bidm_s1"
    ck = checkpoint.load(work)
    assert ck.ema is None and ck.optimizer is None and ck.step == 2  # slim: the EMA weights only
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["commit"] == "abc123" and manifest["protocol"] == "cifar16-v3"
    device_samples = np.load(work / "samples.npz")["arr_0"]

    import bidm.sample

    def no_sampling(*a, **k):
        raise AssertionError("score must reuse the device's samples")

    def fake_metrics(run_dir, cfg, *, feature_spaces, n_ref=None, cache_dir=None):
        results = [{"feature_space": s, "fid": 100.0 + len(run_dir.name), "sfid": 50.0, "precision": 0.5,
                    "recall": 0.1, "n_samples": n, "n_reference": n_ref}
                   for s, n in feature_spaces.items()]  # fmt: skip
        write_metrics(results, run_dir)
        return json.loads((run_dir / "metrics.json").read_text())

    monkeypatch.setattr(bidm.sample, "generate", no_sampling)
    monkeypatch.setattr(D.P, "ensure_metrics", fake_metrics)
    results = tmp_path / "results.json"
    out = tmp_path / "scored"
    assert D.main(["score", str(bundle), "--results", str(results), "--out", str(out), *common]) == 0
    scored = np.load(out / "bidm_s1" / "samples.npz")
    assert np.array_equal(scored["arr_0"], device_samples)
    data = json.loads(results.read_text())
    assert data["protocol"]["name"] == "cifar16-v3-device" and "GPU" in data["protocol"]["note"]
    rows = [r for r in data["rows"] if r["feature_space"] == "inception"]
    assert sorted((r["method"], r["seed"], r["steps"]) for r in rows) == [("bidm", 1, 2), ("xnor", 1, 2)]
    assert all(r["commit"] == "abc123" and r["machine"] == manifest["machine"] and r["scored_on"] for r in rows)
    assert all(r["config_hash"] == json.loads((out / f"{r['method']}_s1" / "manifest.json").read_text())
               ["config_hash"] for r in rows)  # fmt: skip

    # refusals: a manifest whose overrides no longer give the trained config, and tars that are not run bundles
    tar_path = bundle / "xnor_s1.tar"
    run = D.unpack(tar_path, tmp_path / "x")
    man = json.loads((run / "manifest.json").read_text())
    man["overrides"] = [*man["overrides"], "train.lr=1e-1"]
    (run / "manifest.json").write_text(json.dumps(man))
    with tarfile.open(tmp_path / "changed.tar", "w") as tar:
        for f in sorted(run.iterdir()):
            tar.add(f, arcname=f"xnor_s1/{f.name}")
    args = ["--results", str(tmp_path / "r.json"), "--out", str(tmp_path / "o"), *common]
    with pytest.raises(SystemExit, match="config hash"):
        D.main(["score", str(tmp_path / "changed.tar"), *args])
    # a tar that is not a run bundle (a path outside its folder) is refused before anything is written
    evil = tmp_path / "evil.tar"
    (tmp_path / "payload").write_text("x")
    with tarfile.open(evil, "w") as tar:
        tar.add(tmp_path / "payload", arcname="../payload")
    with pytest.raises(SystemExit, match="not a run bundle"):
        D.main(["score", str(evil), *args])
    with tarfile.open(evil, "w") as tar:  # a known file name, but in the parent folder
        tar.add(tmp_path / "payload", arcname="../samples.json")
    with pytest.raises(SystemExit, match="not a run bundle"):
        D.main(["score", str(evil), *args])
    assert not (tmp_path / "samples.json").exists()
    assert not (tmp_path / "r.json").exists()


def test_train_refuses_missing_data_too_many_runs_and_a_plan_over_its_deadline(setup):
    D, tmp_path, common = setup
    data = tmp_path / "train16.npz"
    D.main(["pack-data", "--out", str(data), *common])
    with pytest.raises(SystemExit, match="at most ~0 steps per run fit"):
        D.main(["train", "--data", str(data), "--methods", "xnor", "--bundle", str(tmp_path / "b"), "--work",
                str(tmp_path / "w"), "--deadline", "1e-4", "--calibrate-steps", "2", "--set", "train.batch_size=2",
                *common])  # fmt: skip
    assert not (tmp_path / "b").exists()  # refused before any real run
    with pytest.raises(SystemExit, match="pack-data"):
        D.main(["train", "--data", str(tmp_path / "none.npz"), "--bundle", str(tmp_path / "b"), *common])
    with pytest.raises(SystemExit, match="at most 8"):
        D.main(["train", "--data", str(tmp_path / "none.npz"), "--bundle", str(tmp_path / "b"), "--seeds",
                "0,1,2,3,4", *common])  # fmt: skip
