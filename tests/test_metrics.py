"""Metric math on hand-checkable cases (pure numpy; no networks)."""

import numpy as np
import pytest

from bidm.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    knn_radii,
    manifold_coverage,
    precision_recall,
    softmax,
)


def test_feature_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 3))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False))


def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert abs(fid_from_features(x, x)) < 1e-6


def test_fid_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-9)


def test_fid_equal_full_covariances_is_mean_distance():
    a = np.random.default_rng(2).normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)
    mu1, mu2 = np.zeros(6), np.arange(6.0)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx((mu2**2).sum(), rel=1e-7)


def test_fid_singular_covariance_stays_finite():
    x = np.random.default_rng(3).normal(size=(4, 10))  # rank-3 covariances in 10-d
    y = np.random.default_rng(4).normal(size=(4, 10))
    with np.errstate(all="ignore"):
        value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_fid_large_imaginary_part_raises():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]), method="sqrtm")


def test_fid_eigh_path_equals_sqrtm_path():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(40, 12)) * 1.5 + 0.3
    stats = (*feature_stats(a), *feature_stats(b))
    assert frechet_distance(*stats) == pytest.approx(frechet_distance(*stats, method="sqrtm"), rel=1e-9)


def test_knn_radii_and_coverage_on_a_line():
    real = np.arange(10.0)[:, None]  # 0..9
    radii = knn_radii(real, k=3)
    assert radii[0] == 9.0  # 3rd neighbour of 0 is 3 (squared distance)
    assert radii[5] == 4.0  # neighbours 4, 6, then 3 or 7 at distance 2
    inside = manifold_coverage(real, radii, np.array([[-2.5], [4.5], [14.0]]))
    assert inside.tolist() == [True, True, False]  # 14 is 5 from 9, whose radius is 3


def test_precision_recall_hand_computed():
    real = np.arange(5.0)[:, None]  # radii (k=1): 1 each
    fake = np.array([[0.5], [10.0]])  # radii (k=1): 9.5 each
    p, r = precision_recall(real, fake, k=1)
    assert p == 0.5  # 0.5 lies in B(0, 1); 10 lies in no real ball
    assert r == 1.0  # every real point lies in B(0.5, 9.5)
    assert precision_recall(real, fake, k=1, batch_size=1) == (p, r)


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(5).normal(size=(40, 4))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_inception_score_uniform_is_one():
    assert inception_score(np.full((20, 7), 1 / 7), splits=4) == pytest.approx((1.0, 0.0))


def test_inception_score_evenly_spread_one_hot_is_n_classes():
    probs = np.eye(10)[np.arange(40) % 10]
    mean, std = inception_score(probs, splits=1)
    assert mean == pytest.approx(10.0)
    assert inception_score(probs, splits=4) == pytest.approx((10.0, 0.0))  # each split holds every class


def test_inception_score_from_logits_and_validation():
    logits = 50.0 * np.eye(5)[np.arange(10) % 5]
    assert inception_score(logits, splits=2, logits=True)[0] == pytest.approx(5.0, rel=1e-6)
    np.testing.assert_allclose(softmax(logits).sum(1), 1.0)
    with pytest.raises(ValueError, match="logits=True"):
        inception_score(logits, splits=2)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.eye(3), splits=4)
