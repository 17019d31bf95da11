"""bench/sample_stats.py: pixel statistics checked on hand-made images."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import sample_stats  # noqa: E402


def test_black_and_white_images():
    images = np.stack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)])
    s = sample_stats.pixel_stats(images)
    assert s == pytest.approx({"n": 2, "spread": 0.5, "contrast": 0.0, "edge": 0.0, "chroma": 0.0, "mean": 0.5})


def test_one_red_pixel():
    img = np.zeros((1, 2, 2, 3), np.uint8)
    img[0, 0, 0, 0] = 255  # top-left pure red
    s = sample_stats.pixel_stats(img)
    assert s["chroma"] == pytest.approx(0.25)  # max - min = 1 at one of 4 pixels
    # |diff| along rows: 1 of 6 entries (2 cols x 3 ch) is 1, likewise along columns: 1/6 + 1/6
    assert s["edge"] == pytest.approx(2 / 6)
    assert s["mean"] == pytest.approx(1 / 12)


def test_cli_writes_rows(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "samples.npz", np.zeros((3, 4, 4, 3), np.uint8))
    out = tmp_path / "stats.json"
    assert sample_stats.main([str(run), str(tmp_path / "missing"), "--out", str(out)]) == 0
    assert "| 3 |" in capsys.readouterr().out
    assert out.exists()
