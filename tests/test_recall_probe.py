"""bench/recall_probe.py: the pixel repairs checked on hand-made images (the Inception scoring is the quality
bench's, tested there)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import recall_probe  # noqa: E402

from bidm import metrics  # noqa: E402


def test_chroma_of_a_red_and_a_grey_pixel():
    img = np.array([[[[255, 0, 0], [128, 128, 128]]]], np.uint8)
    assert recall_probe.chroma(img) == pytest.approx(0.5)


def test_scale_chroma_halves_colour_and_keeps_grey():
    img = np.array([[[[200, 100, 0], [90, 90, 90]]]], np.uint8)
    out = recall_probe.scale_chroma(img, 0.5)
    assert out[0, 0, 0].tolist() == [150, 100, 50]  # grey 100, offsets halved
    assert out[0, 0, 1].tolist() == [90, 90, 90]
    assert recall_probe.chroma(out) == pytest.approx(recall_probe.chroma(img) / 2, abs=1e-3)


def test_repair_reaches_the_target_chroma():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, size=(8, 6, 6, 3), dtype=np.uint8)
    out = recall_probe.repair(img, "chroma", target_chroma=0.1)
    assert recall_probe.chroma(out) == pytest.approx(0.1, abs=5e-3)


def test_blur_by_hand():
    img = np.zeros((1, 3, 3, 1), np.uint8)
    img[0, 1, 1, 0] = 160
    out = recall_probe.blur(img)[0, :, :, 0]
    # [1, 2, 1] / 4 in each direction: centre 160 * 1/4, edge-adjacent 160 * 1/8, corners 160 * 1/16
    assert out.tolist() == [[10, 20, 10], [20, 40, 20], [10, 20, 10]]
    flat = np.full((1, 4, 4, 3), 77, np.uint8)
    assert (recall_probe.blur(flat) == 77).all()  # edge replication keeps a flat image flat


def test_geometry_by_hand():
    # reals on a line at 0, 1, 2, 3, 10 (k = 1: each real's ball radius is the distance to its nearest real)
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
    fake = np.array([[0.1], [0.2], [9.0]], np.float32)
    g = recall_probe.geometry(real, fake, k=1)
    assert g["precision"] == 1.0  # every sample lies in some real ball (0.1, 0.2 in real 0's, 9.0 in real 10's)
    assert recall_probe.geometry(real, fake, k=1, r_real=metrics.knn_radii(real, 1)) == g
    # nearest sample per real: 0.1, 0.8, 1.8, 2.8, 1.0; real radii (k=1): 1, 1, 1, 1, 7
    assert g["coverage"] == pytest.approx(3 / 5)  # reals 0, 1 and 10 hold a sample in their ball
    assert g["d_real"] == pytest.approx(1.0, abs=1e-5)
    # samples 0.1 and 0.2 lie in the balls of reals 0 and 1 (2 each), 9.0 only in real 10's: density (2+2+1)/3
    assert g["density"] == pytest.approx(5 / 3)
    # sample radii (k=1): 0.1, 0.1, 8.8
    assert g["r_fake"] == pytest.approx(0.1, abs=1e-5)
