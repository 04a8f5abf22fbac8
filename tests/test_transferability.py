"""LogME, LEEP, NCE and ridge LOO against independent oracles and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import BayesianRidge

from t2v_core.recommend.transferability import leep, logme, nce, ridge_loo

TINY = 1e-300  # gamma hyper-priors this flat make BayesianRidge's evidence LogME's exactly


def sklearn_evidence_per_sample(features: np.ndarray, column: np.ndarray) -> float:
    """Log marginal likelihood of BayesianRidge without intercept, started like LogME."""
    model = BayesianRidge(
        fit_intercept=False,
        compute_score=True,
        alpha_1=TINY,
        alpha_2=TINY,
        lambda_1=TINY,
        lambda_2=TINY,
        alpha_init=1.0,  # noise precision β
        lambda_init=1.0,  # weight precision α
        tol=1e-14,
        max_iter=100_000,
    ).fit(features, column)
    return model.scores_[-1] / features.shape[0]


@pytest.mark.parametrize("n,d", [(80, 6), (40, 40), (12, 30)])
def test_logme_equals_bayesian_ridge_evidence(n: int, d: int) -> None:
    rng = np.random.default_rng(n + d)
    labels = rng.integers(0, 3, size=n)
    features = rng.normal(size=(n, d))
    features[:, 0] += 1.5 * labels  # some signal, so α and β settle away from their start
    expected = np.mean(
        [sklearn_evidence_per_sample(features, (labels == k).astype(float)) for k in range(3)]
    )
    assert logme(features, labels) == pytest.approx(expected, abs=1e-6)


def test_logme_single_column_evidence() -> None:
    """Binary labels: LogME is the mean of the two columns' evidences, each BayesianRidge's."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=50)
    features = rng.normal(size=(50, 4)) + labels[:, None]
    cols = [sklearn_evidence_per_sample(features, (labels == k).astype(float)) for k in (0, 1)]
    assert logme(features, labels) == pytest.approx(np.mean(cols), abs=1e-6)
    assert logme(features, labels.astype(str)) == pytest.approx(logme(features, labels))


def test_logme_prefers_informative_features() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=120)
    means = rng.normal(size=(4, 8))
    good = 3 * means[labels] + rng.normal(size=(120, 8))
    noise = rng.normal(size=(120, 8))
    assert logme(good, labels) > logme(noise, labels)


def test_logme_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        logme(np.ones(5), np.zeros(5))
    with pytest.raises(ValueError):
        logme(np.full((3, 2), np.nan), np.zeros(3))
    with pytest.raises(ValueError):
        logme(np.ones((3, 2)), np.zeros(4))


def test_leep_hand_computed() -> None:
    # Joint P(y,z): y=0 -> [0.5, 1/6], y=1 -> [0, 1/3]; P(z) = [1/2, 1/2];
    # P(y=0|z) = [1, 1/3]. Per-sample likelihoods: 2/3, 1, 2/3.
    theta = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    assert leep(theta, [0, 0, 1]) == pytest.approx(2 / 3 * math.log(2 / 3), abs=1e-12)


def test_leep_limits() -> None:
    y = np.array([0, 1, 2, 1, 0, 2])
    perfect = np.eye(4)[[3, 0, 1, 0, 3, 1]]  # a deterministic source class per target class
    assert leep(perfect, y) == pytest.approx(0.0, abs=1e-12)
    flat = np.full((6, 4), 0.25)  # source head says nothing: LEEP = Σ P(y) log P(y) = −H(Y)
    assert leep(flat, y) == pytest.approx(math.log(1 / 3), abs=1e-12)


def test_nce_hand_computed() -> None:
    # P(y|z=0) = [2/3, 1/3], P(y|z=1) = [1/3, 2/3], P(z) = 1/2 each.
    y = [0, 0, 1, 1, 1, 0]
    z = [0, 0, 0, 1, 1, 1]
    expected = 2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)
    assert nce(z, y) == pytest.approx(expected, abs=1e-12)


def test_nce_limits() -> None:
    assert nce([5, 7, 9, 5], ["a", "b", "b", "a"]) == pytest.approx(0.0, abs=1e-12)  # Z decides Y
    # Independent: every (y, z) pair equally often -> −H(Y|Z) = −H(Y) = −log 2.
    assert nce([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-math.log(2), abs=1e-12)
    # Unbalanced independent design: H(Y) with P(y) = (1/4, 3/4).
    z = [0, 1] * 4
    y = [0, 0, 1, 1, 1, 1, 1, 1]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert nce(z, y) == pytest.approx(-h, abs=1e-12)
    with pytest.raises(ValueError):
        nce([0, 1], [0, 1, 1])


def brute_force_press(features: np.ndarray, labels: np.ndarray, lam: float) -> float:
    """PRESS / N by refitting the ridge probe (with an intercept) once per held-out sample."""
    y = np.eye(labels.max() + 1)[labels]
    total = 0.0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        mu, y_mu = features[keep].mean(0), y[keep].mean(0)
        fc = features[keep] - mu
        w = np.linalg.solve(fc.T @ fc + lam * np.eye(features.shape[1]), fc.T @ (y[keep] - y_mu))
        total += float(((y[i] - (features[i] - mu) @ w - y_mu) ** 2).sum())
    return total / len(labels)


@pytest.mark.parametrize("n,d", [(40, 5), (15, 30)])
def test_ridge_loo_equals_refitting_without_each_sample(n: int, d: int) -> None:
    rng = np.random.default_rng(n * d)
    labels = rng.integers(0, 3, size=n)
    features = rng.normal(size=(n, d)) + labels[:, None] * rng.normal(size=d)
    s2 = np.linalg.svd(features - features.mean(0), compute_uv=False) ** 2
    lam = 0.3 * s2[s2 > 1e-9].mean()
    assert ridge_loo(features, labels, grid=[0.3]) == pytest.approx(
        -brute_force_press(features, labels, lam), rel=1e-9)
    # the default picks the best λ of its grid, so it is no worse than any one of them
    assert ridge_loo(features, labels) >= ridge_loo(features, labels, grid=[0.3]) - 1e-12


def test_ridge_loo_invariances_and_ordering() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=100)
    good = 3 * rng.normal(size=(4, 10))[labels] + rng.normal(size=(100, 10))
    noise = rng.normal(size=(100, 10))
    score = ridge_loo(good, labels)
    assert score > ridge_loo(noise, labels)
    # the feature scale, a shift and the names of the classes change nothing
    assert ridge_loo(7.0 * good + 3.0, labels) == pytest.approx(score, rel=1e-9)
    assert ridge_loo(good, (labels + 2) % 4) == pytest.approx(score, rel=1e-9)
    # pure noise predicts no better than the class frequencies, whose PRESS is about C−1 / C
    assert ridge_loo(noise, labels) == pytest.approx(-0.75, abs=0.05)
    assert ridge_loo(good, np.zeros(100, int)) == 0.0  # one class: nothing to predict
    # constant features leave the intercept alone: each label predicted by the others' mean
    const = np.ones((12, 3))
    few = np.arange(12) % 3
    assert ridge_loo(const, few) == pytest.approx(-brute_force_press(const, few, 1.0), rel=1e-9)


def test_ridge_loo_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N×D"):
        ridge_loo(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        ridge_loo(np.full((3, 2), np.nan), np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        ridge_loo(np.zeros((3, 2)), np.zeros(4))
