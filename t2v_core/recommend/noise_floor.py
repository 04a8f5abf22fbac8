"""How far above the test-set oracle a perfect selector would still score.

Table 1 measures each pick against the oracle: the expert with the lowest *measured* test
error. Each measured error is a proportion over a finite test set, so the oracle is the
luckiest of E noisy estimates (the winner's curse), and even the expert that is truly best
scores above it. :func:`oracle_noise_floor` estimates that gap by a parametric bootstrap:
taking the measured errors as the truth, it re-measures every cell as
Binomial(n_test, error) / n_test, and scores the true best expert against the re-measured
oracle with the same relative-increase formula as the table.

The same re-measurements give the ranking's ceiling: the weighted τ (the table's formula) of
the ranking by the true errors against the re-measured ones. Even a selector that knew every
expert's true error would score about this, not 1, so it says how much of the gap between a
selector's τ and 1 is the test sets' noise and how much is the selector's.

Experts are re-measured independently. Experts evaluated on the same test images make
correlated errors, which shrinks the noise of their differences, so the floor is an upper
bound: selectors cannot be expected to get below it, and may be closer to the oracle than it
suggests only by luck; for the same reason the τ ceiling is a lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from t2v_core.recommend.metrics import (
    DEFAULT_ERROR_FLOOR,
    ranked_weighted_tau,
    relative_increase,
)

__all__ = ["NoiseFloor", "TAU_RESAMPLES", "oracle_noise_floor"]


@dataclass(frozen=True)
class NoiseFloor:
    """Mean relative increase of the true best expert over the re-measured oracle, in percent."""

    mean_pct: float
    ci95_pct: tuple[float, float]  # spread over bootstrap re-measurements
    n_resamples: int
    n_tasks: int
    # Weighted τ of the true-error ranking against re-measured errors, mean over tasks: the
    # ranking's ceiling, and its spread over the first ``TAU_RESAMPLES`` re-measurements.
    weighted_tau: float = math.nan
    weighted_tau_ci95: tuple[float, float] = (math.nan, math.nan)


# scipy's weighted τ costs ~0.2 ms a task, and a mean over tasks settles within a few dozen
# re-measurements: the ceiling reads only the first ones.
TAU_RESAMPLES = 100


def _true_orders(truth: np.ndarray, observed: np.ndarray) -> list[np.ndarray]:
    """Each task's observed experts ranked by their true error: the same in every
    re-measurement."""
    return [np.flatnonzero(seen)[np.argsort(row[seen], kind="stable")]
            for row, seen in zip(truth, observed, strict=True)]


def _ceiling_tau(orders: list[np.ndarray], remeasured: np.ndarray) -> float:
    """Mean over tasks of the weighted τ between the true ``orders`` and ``remeasured``
    (tasks whose re-measured errors are all equal have no order and are left out)."""
    taus = []
    for ranked, row_new in zip(orders, remeasured, strict=True):
        tau = ranked_weighted_tau(row_new[ranked])
        if not math.isnan(tau):
            taus.append(tau)
    return float(np.mean(taus)) if taus else math.nan


def oracle_noise_floor(
    errors,
    n_test: Sequence[int],
    *,
    error_floor: float = DEFAULT_ERROR_FLOOR,
    n_resamples: int = 500,
    random_state: int = 0,
) -> NoiseFloor:
    """Parametric-bootstrap floor of Table 1 for a T×E error matrix and each task's test size.

    Missing cells (NaN) are left out of the re-measurement; tasks with no observed cell are
    skipped. Deterministic for a given ``random_state``.
    """
    err = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(n_test, dtype=np.int64)
    if err.ndim != 2 or sizes.shape != (err.shape[0],):
        raise ValueError(f"need T×E errors and T test sizes, got {err.shape} and {sizes.shape}")
    if (sizes < 1).any():
        raise ValueError("every task needs at least one test image")
    keep = np.isfinite(err).any(axis=1)
    err, sizes = err[keep], sizes[keep]
    if err.shape[0] == 0:
        raise ValueError("no task has an observed error")
    observed = np.isfinite(err)
    truth = np.clip(np.where(observed, err, 0.0), 0.0, 1.0)
    best = np.argmin(np.where(observed, err, np.inf), axis=1)
    rows = np.arange(err.shape[0])
    rng = np.random.default_rng(random_state)
    means = np.empty(n_resamples)
    orders, taus = _true_orders(truth, observed), []
    for r in range(n_resamples):
        remeasured = rng.binomial(sizes[:, None], truth) / sizes[:, None]
        oracle = np.where(observed, remeasured, np.inf).min(axis=1)
        increase = relative_increase(remeasured[rows, best], oracle, error_floor)
        means[r] = 100.0 * increase.mean()
        if r < TAU_RESAMPLES:
            taus.append(_ceiling_tau(orders, remeasured))
    low, high = np.percentile(means, [2.5, 97.5])
    kept = np.asarray([t for t in taus if math.isfinite(t)])
    tau_ci = tuple(float(v) for v in np.percentile(kept, [2.5, 97.5])) if kept.size else (
        math.nan, math.nan)
    return NoiseFloor(
        mean_pct=float(means.mean()),
        ci95_pct=(float(low), float(high)),
        n_resamples=int(n_resamples),
        n_tasks=int(err.shape[0]),
        weighted_tau=float(kept.mean()) if kept.size else math.nan,
        weighted_tau_ci95=tau_ci,
    )
