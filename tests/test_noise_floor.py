"""The test-noise floor of Table 1: a perfect selector's score against a noisy oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2v_core.recommend.noise_floor import oracle_noise_floor


def test_two_equal_experts_match_the_closed_form() -> None:
    """Two experts with the same true error p on n images: the best one's increase over the
    re-measured oracle is (X − min(X, Y)) / min(X, Y) with X, Y ~ Bin(n, p) independent;
    its mean is computable exactly by summing over the joint binomial distribution."""
    from scipy import stats

    n, p = 40, 0.3
    k = np.arange(n + 1)
    pmf = stats.binom.pmf(k, n, p)
    x, y = np.meshgrid(k, k, indexing="ij")
    low = np.minimum(x, y) / n
    exact = 100.0 * np.sum(np.outer(pmf, pmf) * (x / n - low) / np.maximum(low, 0.02))
    floor = oracle_noise_floor(np.full((200, 2), p), [n] * 200, error_floor=0.02, n_resamples=400)
    assert floor.mean_pct == pytest.approx(exact, rel=0.03)
    assert floor.ci95_pct[0] < exact < floor.ci95_pct[1]


def test_more_test_images_lower_the_floor() -> None:
    rng = np.random.default_rng(0)
    errors = rng.uniform(0.05, 0.3, size=(30, 8))
    floors = [oracle_noise_floor(errors, [n] * 30).mean_pct for n in (50, 500, 50_000)]
    assert floors[0] > floors[1] > floors[2] > 0.0
    assert floors[2] < 0.1 * floors[0]


def test_noiseless_cells_and_clear_winners_give_no_floor() -> None:
    # errors of exactly 0 or 1 have no binomial noise: the best stays the oracle
    assert oracle_noise_floor(np.array([[0.0, 1.0], [1.0, 0.0]]), [10, 10]).mean_pct == 0.0
    # a winner far ahead of the rest on many images is never overtaken
    far = oracle_noise_floor(np.array([[0.05, 0.6, 0.7]] * 5), [2000] * 5)
    assert far.mean_pct == pytest.approx(0.0, abs=1e-9)


def test_missing_cells_tasks_and_bad_input() -> None:
    errors = np.array([[0.1, np.nan, 0.2], [np.nan, np.nan, np.nan], [0.3, 0.25, np.nan]])
    floor = oracle_noise_floor(errors, [100, 100, 100], random_state=3)
    assert floor.n_tasks == 2 and math.isfinite(floor.mean_pct)
    assert floor == oracle_noise_floor(errors, [100, 100, 100], random_state=3)  # deterministic
    with pytest.raises(ValueError):
        oracle_noise_floor(errors, [100, 100])
    with pytest.raises(ValueError):
        oracle_noise_floor(errors, [100, 0, 100])
    with pytest.raises(ValueError):
        oracle_noise_floor(np.full((2, 2), np.nan), [5, 5])
