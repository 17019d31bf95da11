import numpy as np
import pytest
import torch

from bidm.config import Config, from_dict, load_config, parse_override, to_dict
from bidm.data import load_dataset
from bidm.errors import ConfigError, DataError


def test_defaults_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 7}\nmodel: {ch_mult: [1, 2]}\n")
    cfg = load_config(path, ["train.lr=3e-4", "data.path=/x", "binarize.options={k: 1}"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.model.ch_mult == (1, 2)
    assert cfg.data.path == "/x" and cfg.binarize.options == {"k": 1}
    assert cfg.train.batch_size == Config().train.batch_size
    assert from_dict(to_dict(cfg)) == cfg


def test_dotted_overrides_into_options_merge():
    cfg = load_config(None, ["binarize.options.a=1", "binarize.options.b=false", "binarize.method_options.bidm.c=2"])
    assert cfg.binarize.options == {"a": 1, "b": False} and cfg.binarize.method_options == {"bidm": {"c": 2}}
    cfg = load_config(None, ["binarize.options.a=1", "binarize.options={b: 2}"])
    assert cfg.binarize.options == {"b": 2}  # a whole mapping replaces


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.stepz=3", "unknown config key.*train.stepz"),
        ("nope=1", "unknown config key"),
        ("train.steps=abc", "train.steps: expected int"),
        ("train.steps", "not of the form"),
        ("model.ch=30", "multiples of 32"),
        ("model.arch=vit", "model.arch"),
    ],
)
def test_bad_overrides_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("a.b=1e-3") == {"a": {"b": 1e-3}}
    assert parse_override("a=none") == {"a": "none"}
    cfg = load_config(None, ["data.path=none", "binarize.feature_loss=none", "binarize.method=none"])
    assert cfg.data.path is None and cfg.binarize.feature_loss == "none" and cfg.binarize.method == "none"
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}


def test_digits_builder_range_and_size():
    x, y = load_dataset("digits", size=16)
    assert x.shape == (1797, 1, 16, 16) and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9
    x3, _ = load_dataset("digits", size=8, channels=3)
    assert x3.shape == (1797, 3, 8, 8)


def test_cifar_npz_and_pickle_layouts(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=images, labels=np.arange(6))
    x, y = load_dataset("cifar10", path=str(tmp_path), split="train")
    assert x.shape == (6, 3, 32, 32) and y.tolist() == list(range(6))
    torch.testing.assert_close(x[0, :, 0, 0], torch.from_numpy(images[0, 0, 0]).float() / 127.5 - 1)
    small, _ = load_dataset("cifar10", path=str(tmp_path / "train.npz"), size=16)
    assert small.shape == (6, 3, 16, 16)

    import pickle

    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    data = images.transpose(0, 3, 1, 2).reshape(6, -1)
    with open(batches / "test_batch", "wb") as fh:
        pickle.dump({"data": data, "labels": list(range(6))}, fh)
    xt, _ = load_dataset("cifar10", path=str(tmp_path), split="test")
    torch.testing.assert_close(xt, x)


def test_missing_or_malformed_data(tmp_path):
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="no CIFAR-10 data"):
        load_dataset("cifar10", path=str(tmp_path))
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 32, 32), dtype=np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        load_dataset("cifar10", path=str(tmp_path / "bad.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("cifar10", path=str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="image directory"):
        load_dataset("folder", path=str(tmp_path / "none"))


def test_folder_builder_crops_and_resizes(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 40, 3), 255, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(tmp_path / "b.jpg")
    x, y = load_dataset("folder", path=str(tmp_path), size=8)
    assert x.shape == (2, 3, 8, 8) and y is None
    assert x[0].min() > 0.99 and x[1].max() < -0.99
