"""How one ranking scores on one task, and how the per-task scores add up to a meta-task.

The unit of every score is the relative error increase over the task's best expert,
:func:`relative_increase`; MODEL2VEC's training targets, the selectors that tune on their
training tasks and the noise floor use the same formula, so they optimise what Table 1 reports.

Per task (:func:`task_metrics`):

* relative error increase of the picked expert over the oracle's, in percent,
  (err_picked − err_oracle) / err_oracle — the paper's Table 1;
* top-1 hit (the pick has the best error, ties included);
* best-of-top-k regret: the relative increase of the best expert among the top k;
* Kendall τ and weighted Kendall τ (``scipy.stats.weightedtau``, default hyperbolic weigher,
  which stresses the top of the ranking) between the predicted and the true ranking.

Missing matrix cells (NaN) are skipped: a ranking is scored by its experts with an observed
error, in the order given. The oracle error is floored at ``error_floor`` in denominators, so
a task some expert solves perfectly does not divide by zero. :data:`DEFAULT_ERROR_FLOOR` is the
one default of that floor: every fit that tunes on relative increases takes the floor of the
evaluation it is scored by, so a near-perfect training task weighs the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "DEFAULT_ERROR_FLOOR",
    "MetaTaskScores",
    "aggregate",
    "bootstrap_mean_ci",
    "expected_chance",
    "mean_over_repeats",
    "relative_increase",
    "ranked_weighted_tau",
    "task_metrics",
]

# Oracle errors below this count as this in (err − oracle) / oracle: the evaluation's default,
# and so that of every fit scored by it.
DEFAULT_ERROR_FLOOR = 0.02


def relative_increase(err, best, floor: float, *, percent: bool = False):
    """(err − best) / max(best, floor): how much worse than the best expert, as a fraction
    (or in percent with ``percent=True``).

    Works on scalars and broadcasts over arrays; the floor keeps a task that some expert
    solves perfectly from turning any miss into an infinite increase.
    """
    gap = err - best
    return (100.0 * gap if percent else gap) / np.maximum(best, floor)


@dataclass
class MetaTaskScores:
    """One selector's metrics averaged over the tasks of one meta-task."""

    n_tasks: int
    relative_increase_pct: float
    top1_hit_rate: float
    regret_at_k_pct: dict[int, float]
    kendall_tau: float
    weighted_tau: float
    # 95% bootstrap interval of relative_increase_pct over the meta-task's tasks: a mean over
    # a few dozen heavy-tailed per-task increases moves by several points with the task draw.
    relative_increase_ci95_pct: tuple[float, float] = (math.nan, math.nan)
    # mean test error of the picked expert and of the oracle's (the paper's "Optimal"), and
    # their ratio: a view of the same picks that a few near-perfect tasks cannot dominate.
    mean_error: float = math.nan
    oracle_mean_error: float = math.nan
    error_ratio: float = math.nan


def ranked_weighted_tau(ranked_errors) -> float:
    """Weighted τ between a ranking and the true order, given the errors of the experts in the
    ranking's order, best-ranked first (NaN with fewer than two or all equal: no order)."""
    err = np.asarray(ranked_errors, dtype=np.float64)
    if err.size < 2 or np.ptp(err) == 0:
        return math.nan
    predicted = -np.arange(err.size, dtype=np.float64)  # higher = ranked better
    return float(stats.weightedtau(predicted, -err).statistic)


def task_metrics(
    errors_row, ranking, ks: Sequence[int] = (1, 3, 5),
    error_floor: float = DEFAULT_ERROR_FLOOR,
) -> dict[str, Any] | None:
    """Metrics of one ranking on one task's matrix row; None if the row has no observed error."""
    err = np.asarray(errors_row, dtype=np.float64)
    observed = np.isfinite(err)
    if not observed.any():
        return None
    ranked = np.asarray([i for i in ranking if observed[i]], dtype=np.int64)
    best = err[observed].min()
    picked = err[ranked[0]]
    regrets = {
        int(k): relative_increase(err[ranked[:k]].min(), best, error_floor, percent=True)
        for k in ks
    }
    kt = wt = math.nan  # a ranking of equal errors has no order to recover
    if ranked.size >= 2 and np.ptp(err[ranked]) > 0:
        predicted = -np.arange(ranked.size, dtype=np.float64)  # higher = ranked better
        kt = float(stats.kendalltau(predicted, -err[ranked]).statistic)
        wt = ranked_weighted_tau(err[ranked])
    return {
        "relative_increase_pct": relative_increase(picked, best, error_floor, percent=True),
        "hit": bool(picked <= best + 1e-12),
        "error": float(picked),
        "oracle_error": float(best),
        "regret_at_k_pct": regrets,
        "kendall_tau": kt,
        "weighted_tau": wt,
    }


def bootstrap_mean_ci(
    values: Sequence[float], level: float = 0.95, n_resamples: int = 2000, random_state: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over resampled tasks; NaNs are dropped.

    Deterministic for a given ``random_state``; (nan, nan) with no values.
    """
    vals = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if vals.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(random_state)
    means = vals[rng.integers(0, vals.size, size=(n_resamples, vals.size))].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return (float(low), float(high))


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def mean_over_repeats(runs: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One task's metrics averaged over repeated fold assignments (NaN-aware; ``hit`` becomes
    a rate). None when the task has no observed error, which holds for every repeat alike."""
    rows = [r for r in runs if r is not None]
    if not rows:
        return None
    mean = {key: _nanmean([float(r[key]) for r in rows])
            for key in ("relative_increase_pct", "hit", "kendall_tau", "weighted_tau", "error",
                        "oracle_error")}
    mean["regret_at_k_pct"] = {
        k: _nanmean([r["regret_at_k_pct"][k] for r in rows]) for k in rows[0]["regret_at_k_pct"]
    }
    return mean


def aggregate(
    per_task: Sequence[dict[str, Any] | None], idx: Sequence[int], ks: Sequence[int]
) -> MetaTaskScores:
    """The mean scores of the tasks ``idx`` (those with an observed error) of a meta-task."""
    rows = [per_task[i] for i in idx if per_task[i] is not None]
    mean_error = _nanmean([r["error"] for r in rows])
    oracle_error = _nanmean([r["oracle_error"] for r in rows])
    return MetaTaskScores(
        n_tasks=len(rows),
        relative_increase_pct=_nanmean([r["relative_increase_pct"] for r in rows]),
        top1_hit_rate=_nanmean([float(r["hit"]) for r in rows]),
        regret_at_k_pct={
            int(k): _nanmean([r["regret_at_k_pct"][int(k)] for r in rows]) for k in ks
        },
        kendall_tau=_nanmean([r["kendall_tau"] for r in rows]),
        weighted_tau=_nanmean([r["weighted_tau"] for r in rows]),
        relative_increase_ci95_pct=bootstrap_mean_ci([r["relative_increase_pct"] for r in rows]),
        mean_error=mean_error,
        oracle_mean_error=oracle_error,
        error_ratio=mean_error / oracle_error if oracle_error > 0 else math.nan,
    )


def expected_chance(errors: np.ndarray, idx: Sequence[int], error_floor: float) -> float:
    """Mean relative increase (percent) of a uniformly random expert over the tasks ``idx``:
    the exact chance level."""
    values = []
    for t in idx:
        row = errors[t][np.isfinite(errors[t])]
        if row.size:
            values.append(100.0 * np.mean(relative_increase(row, row.min(), error_floor)))
    return float(np.mean(values)) if values else math.nan
