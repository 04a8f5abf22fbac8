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


def test_the_tau_ceiling_of_two_experts_matches_the_closed_form() -> None:
    """Two experts with true errors p1 < p2 on n images: weighted τ of two items is +1 when
    the re-measured errors keep their order and −1 when they swap, and a tie has no order, so
    the ceiling is (P(X < Y) − P(X > Y)) / (1 − P(X = Y)) for X ~ Bin(n, p1), Y ~ Bin(n, p2)."""
    from scipy import stats

    n, p1, p2 = 30, 0.2, 0.3
    k = np.arange(n + 1)
    joint = np.outer(stats.binom.pmf(k, n, p1), stats.binom.pmf(k, n, p2))
    x, y = np.meshgrid(k, k, indexing="ij")
    kept, swapped, tied = joint[x < y].sum(), joint[x > y].sum(), joint[x == y].sum()
    exact = (kept - swapped) / (1 - tied)
    floor = oracle_noise_floor(np.tile([p1, p2], (200, 1)), [n] * 200, n_resamples=60)
    assert floor.weighted_tau == pytest.approx(exact, abs=0.02)
    assert floor.weighted_tau_ci95[0] < exact < floor.weighted_tau_ci95[1]


def test_the_tau_ceiling_rises_to_one_as_test_sets_grow() -> None:
    rng = np.random.default_rng(1)
    errors = rng.uniform(0.05, 0.4, size=(20, 6))
    ceilings = [oracle_noise_floor(errors, [n] * 20, n_resamples=30).weighted_tau
                for n in (30, 300, 10**7)]
    assert ceilings[0] < ceilings[1] < ceilings[2]
    assert ceilings[2] == pytest.approx(1.0, abs=1e-9)
    # an order that never changes (errors of exactly 0 and 1) and tasks with no order
    assert oracle_noise_floor(np.array([[0.0, 1.0], [1.0, 0.0]]), [10, 10]).weighted_tau == 1.0
    assert math.isnan(oracle_noise_floor(np.full((3, 2), 0.0), [10] * 3).weighted_tau)
