"""What the task embeddings know on their own, before any selector: do they recover the
task families, and does their norm say how hard a task is?"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from t2v_core.embedding import distance as _distance

__all__ = ["FamilyRecovery", "NormDifficulty", "family_recovery", "norm_vs_difficulty"]


@dataclass
class NormDifficulty:
    """Correlation between the norm of a task's embedding and its best achievable error."""

    n_tasks: int
    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float


@dataclass
class FamilyRecovery:
    """Leave-one-out nearest-neighbour family accuracy of a task embedding distance."""

    distance: str
    accuracy: float
    per_family: dict[str, float]
    chance_accuracy: float  # expected accuracy of a uniformly random neighbour


def norm_vs_difficulty(task_embeddings, errors, *, ord: int | float = 2) -> NormDifficulty:
    """Does a task's embedding norm predict how hard it is (its best error over the experts)?"""
    norms = np.linalg.norm(np.asarray(task_embeddings, dtype=np.float64), ord=ord, axis=1)
    err = np.asarray(errors, dtype=np.float64)
    has = np.isfinite(err).any(axis=1)
    best = np.full(err.shape[0], np.nan)
    best[has] = np.nanmin(err[has], axis=1)
    x, y = norms[has], best[has]
    if x.size < 3:
        raise ValueError("need at least 3 tasks with an observed error")
    pearson = stats.pearsonr(x, y)
    spearman = stats.spearmanr(x, y)
    return NormDifficulty(
        n_tasks=int(x.size),
        pearson=float(pearson.statistic),
        pearson_p=float(pearson.pvalue),
        spearman=float(spearman.statistic),
        spearman_p=float(spearman.pvalue),
    )


_DISTANCES: dict[str, Callable[[np.ndarray], Any]] = {
    "d_sym": _distance.d_sym,
    "d_asym": _distance.d_asym,
    "cosine": _distance.cosine,
    "normalized_cosine": _distance.normalized_cosine,
}


def family_recovery(
    task_embeddings, families: Sequence[str], distance: str = "d_sym"
) -> FamilyRecovery:
    """Leave-one-out 1-NN family accuracy: does the embedding recover the task taxonomy?

    For d_asym the neighbour of task t is the source s ≠ t minimising d_asym(s → t).
    """
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {sorted(_DISTANCES)}, got {distance!r}")
    fams = np.asarray([str(f) for f in families])
    emb = np.asarray(task_embeddings, dtype=np.float64)
    if emb.shape[0] != fams.shape[0] or emb.shape[0] < 2:
        raise ValueError("need at least two tasks and one family per task")
    dist = np.array(_DISTANCES[distance](emb), dtype=np.float64)  # rows = sources
    np.fill_diagonal(dist, np.inf)
    neighbour = np.argmin(dist, axis=0)  # for each target column
    correct = fams[neighbour] == fams
    names, counts = np.unique(fams, return_counts=True)
    n = fams.size
    return FamilyRecovery(
        distance=distance,
        accuracy=float(correct.mean()),
        per_family={str(f): float(correct[fams == f].mean()) for f in names},
        chance_accuracy=float(np.sum(counts * (counts - 1)) / (n * (n - 1))),
    )
