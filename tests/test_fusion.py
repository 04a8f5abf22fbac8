"""The listwise fusion: weights follow the signal that tracks the errors, do not depend on a
signal's scale, and never see a training task's own errors through the prior."""

from __future__ import annotations

import numpy as np
import pytest

from t2v_core.recommend.fusion import ListwiseFusion, mean_error_prior, zscore


def tasks(n_tasks: int = 30, n_experts: int = 6, seed: int = 0):
    """Errors, a signal that tracks them (−error + small noise), and one that is pure noise."""
    rng = np.random.default_rng(seed)
    errors = rng.uniform(0.05, 0.6, size=(n_tasks, n_experts))
    rows = [{"good": -e + 0.02 * rng.normal(size=n_experts), "noise": rng.normal(size=n_experts)}
            for e in errors]
    return rows, errors


def test_the_weight_goes_to_the_signal_that_tracks_the_errors():
    rows, errors = tasks()
    coef = ListwiseFusion(("good", "noise")).fit(rows, errors).coef_
    assert coef["good"] > 1.0 and abs(coef["noise"]) < 0.25 * coef["good"]
    flipped = [{"good": -r["good"], "noise": r["noise"]} for r in rows]
    assert ListwiseFusion(("good", "noise")).fit(flipped, errors).coef_["good"] < -1.0


def test_a_signal_rescaled_or_shifted_per_task_gets_the_same_weights():
    rows, errors = tasks()
    rng = np.random.default_rng(1)
    moved = [{"good": 1e4 * r["good"] + rng.normal() * 1e3, "noise": r["noise"] - 7}
             for r in rows]
    a = ListwiseFusion(("good", "noise")).fit(rows, errors).coef_
    b = ListwiseFusion(("good", "noise")).fit(moved, errors).coef_
    assert b == pytest.approx(a, rel=1e-6, abs=1e-8)


def test_missing_signals_and_unmeasured_cells_are_left_out():
    rows, errors = tasks()
    errors = errors.copy()
    errors[:, 0] = np.nan  # an expert never measured: no target there
    for r in rows:
        r["good"][1] = np.nan  # an expert a signal could not score
    fusion = ListwiseFusion(("good", "noise", "absent")).fit(rows, errors)
    assert set(fusion.coef_) == {"good", "noise"} and fusion.coef_["good"] > 1.0
    value = fusion.decision(rows[0], 6)
    assert np.isnan(value[1]) and np.isfinite(value[2:]).all()
    with pytest.raises(ValueError, match="no training task has any"):
        ListwiseFusion(("absent",)).fit(rows, errors)


def test_decision_adds_what_the_row_has_and_zscore_is_per_task():
    fusion = ListwiseFusion.fixed({"a": 2.0, "b": 1.0})
    a = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(fusion.decision({"a": a}, 3), 2 * zscore(a))  # no b: adds 0
    np.testing.assert_allclose(zscore(a), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    np.testing.assert_array_equal(zscore([5.0, 5.0, np.nan]), [0.0, 0.0, np.nan])


def test_the_prior_of_a_training_task_never_reads_its_own_errors():
    errors = np.array([[0.1, 0.5], [0.3, 0.1], [0.9, 0.9]])
    np.testing.assert_allclose(mean_error_prior(errors, 0.02),
                               -np.log(errors.mean(0)))
    np.testing.assert_allclose(mean_error_prior(errors, 0.02, exclude=2),
                               -np.log([0.2, 0.3]))
    changed = errors.copy()
    changed[2] = [0.01, 5.0]
    np.testing.assert_array_equal(mean_error_prior(changed, 0.02, exclude=2),
                                  mean_error_prior(errors, 0.02, exclude=2))
    assert mean_error_prior(np.array([[0.001, 0.5]]), 0.02)[0] == pytest.approx(-np.log(0.02))
