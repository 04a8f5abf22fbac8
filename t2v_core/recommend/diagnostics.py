"""What the task embeddings know on their own, before any selector: do they recover the
task families, and does their norm say how hard a task is, or something else (how many
classes, how many images, which domain)?"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from t2v_core.embedding import distance as _distance

if TYPE_CHECKING:
    from t2v_core.recommend.meta_dataset import MetaDataset
    from t2v_core.zoo.manifest import TaskSpec

__all__ = [
    "FamilyRecovery",
    "FamilyShare",
    "NormCorrelates",
    "NormCorrelation",
    "NormDifficulty",
    "family_recovery",
    "layer_groups",
    "norm_correlates",
    "norm_correlates_of",
    "norm_vs_difficulty",
]


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


# -- what the norm tracks ---------------------------------------------------------------------
ALL_TASKS, WITHIN_FAMILY = "all tasks", "within family"
DEPTH_NAMES = {1: ("all",), 2: ("early", "late"), 3: ("early", "middle", "late")}


@dataclass(frozen=True)
class NormCorrelation:
    """Spearman ρ between one norm of the embedding and one task variable, with a percentile
    bootstrap interval over resampled tasks. ``scope`` is ``"all tasks"``, or ``"within
    family"``: ρ of the ranks inside each family, pooled over the families (each centred on
    its mean rank), the association left once the domain is known."""

    norm: str
    variable: str
    scope: str
    spearman: float
    low: float
    high: float


@dataclass(frozen=True)
class FamilyShare:
    """How much of a norm's rank variance the family explains (η² of the ranks, with a
    bootstrap interval); ``chance`` = (k−1)/(n−1), what a norm unrelated to family gets on
    average, since η² grows with the number of families k among n tasks."""

    norm: str
    eta_squared: float
    low: float
    high: float
    chance: float
    family_medians: dict[str, float]


@dataclass
class NormCorrelates:
    """What the embedding's norms track across the tasks: per norm, Spearman ρ against each
    task variable (over all tasks and within families) and the family's share of its variance.

    ``norms`` and ``variables`` hold the per-task values the statistics came from (aligned
    with ``task_ids``), so a plot or a reader can check them.
    """

    n_tasks: int
    confidence: float
    n_boot: int
    correlations: tuple[NormCorrelation, ...]
    family: tuple[FamilyShare, ...]
    # Spearman ρ between the task variables themselves: two variables that move together
    # (e.g. classes and training images at a fixed number of images per class) cannot be told
    # apart by any norm.
    between_variables: dict[str, dict[str, float]]
    task_ids: tuple[str, ...]
    families: tuple[str, ...]
    norms: dict[str, np.ndarray] = field(repr=False)
    variables: dict[str, np.ndarray] = field(repr=False)

    def get(self, norm: str, variable: str, scope: str = ALL_TASKS) -> NormCorrelation:
        for c in self.correlations:
            if (c.norm, c.variable, c.scope) == (norm, variable, scope):
                return c
        raise KeyError(f"no correlation of {norm!r} with {variable!r} ({scope})")

    def family_share(self, norm: str) -> FamilyShare:
        for f in self.family:
            if f.norm == norm:
                return f
        raise KeyError(f"no family share of {norm!r}")

    def strongest(self, norm: str, scope: str = ALL_TASKS) -> NormCorrelation:
        """The variable this norm tracks best (largest |ρ|)."""
        rows = [c for c in self.correlations if c.norm == norm and c.scope == scope
                and math.isfinite(c.spearman)]
        if not rows:
            raise KeyError(f"no finite correlation of {norm!r} ({scope})")
        return max(rows, key=lambda c: abs(c.spearman))

    def to_dict(self) -> dict[str, Any]:
        """The statistics as plain JSON-ready values (NaN becomes None; no per-task arrays
        beyond the ids, norms and variables as lists)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float | np.floating):
                return float(value) if math.isfinite(value) else None
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, list | tuple | np.ndarray):
                return [clean(v) for v in value]
            if hasattr(value, "__dataclass_fields__"):
                return {k: clean(getattr(value, k)) for k in value.__dataclass_fields__}
            return value.item() if isinstance(value, np.generic) else value

        return clean({k: getattr(self, k) for k in self.__dataclass_fields__})


def layer_groups(filter_names: Sequence[str], n_groups: int = 2) -> dict[str, np.ndarray]:
    """Filter indices of the probe's layers cut into ``n_groups`` runs of consecutive layers
    (``early``/``late``, or ``early``/``middle``/``late``), each with as many layers as can be.
    A filter's layer is its name up to the first ``:`` (``<module>:<kind>:<index>``)."""
    if n_groups not in DEPTH_NAMES:
        raise ValueError(f"n_groups must be one of {sorted(DEPTH_NAMES)}, got {n_groups}")
    layers = [str(n).split(":", 1)[0] for n in filter_names]
    order = list(dict.fromkeys(layers))
    if len(order) < n_groups:
        raise ValueError(f"{len(order)} layers cannot make {n_groups} depth groups")
    depth = np.array([order.index(layer) for layer in layers]) if layers else np.array([], int)
    cuts = np.array_split(np.arange(len(order)), n_groups)
    return {name: np.flatnonzero(np.isin(depth, part))
            for name, part in zip(DEPTH_NAMES[n_groups], cuts, strict=True)}


def embedding_norms(task_embeddings, filter_names: Sequence[str] | None = None,
                    depth_groups: int = 2) -> dict[str, np.ndarray]:
    """Per-task norms: L1 (the total Fisher), L2, the mean log10 value (a level that large
    filters do not dominate) and, with the filter names, the L1 of each depth group."""
    emb = np.asarray(task_embeddings, dtype=np.float64)
    norms = {"L1": np.abs(emb).sum(axis=1), "L2": np.linalg.norm(emb, axis=1),
             "mean log10": np.log10(np.clip(np.abs(emb), 1e-300, None)).mean(axis=1)}
    if filter_names is not None:
        if len(filter_names) != emb.shape[1]:
            raise ValueError(f"{len(filter_names)} filter names for {emb.shape[1]} dimensions")
        for name, idx in layer_groups(filter_names, depth_groups).items():
            norms[f"L1 {name}"] = np.abs(emb[:, idx]).sum(axis=1)
    return norms


def _ranks(values: np.ndarray) -> np.ndarray:
    return stats.rankdata(values, axis=-1)


def _family_centred(ranks: np.ndarray, codes: np.ndarray, n_families: int) -> np.ndarray:
    """Rows of ranks less the mean rank of each task's family (codes: family per column)."""
    counts = np.bincount(codes, minlength=n_families).astype(np.float64)
    sums = np.stack([np.bincount(codes, weights=r, minlength=n_families) for r in ranks])
    means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return ranks - means[:, codes]


def _within_family_ranks(rows: np.ndarray, codes: np.ndarray, n_families: int) -> np.ndarray:
    """Each row ranked inside every family and centred on the family's mean rank: pooled
    over families, their correlation is the within-family Spearman ρ."""
    out = np.zeros_like(rows, dtype=np.float64)
    for c in range(n_families):
        members = codes == c
        if members.any():
            ranks = _ranks(rows[:, members])
            out[:, members] = ranks - ranks.mean(axis=1, keepdims=True)
    return out


def _row_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of every row of ``a`` with every row of ``b`` (NaN where one is constant)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a @ b.T) / np.outer(na, nb)
    tiny = 1e-9 * np.sqrt(a.shape[1])  # ranks are ≥ 1 apart unless constant
    r[(na[:, None] <= tiny) | (nb[None, :] <= tiny)] = np.nan
    return r


def _eta_squared(ranks: np.ndarray, codes: np.ndarray, n_families: int) -> np.ndarray:
    """η² of each row of ranks on the family codes: between-family over total sum of squares."""
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    total = (centred**2).sum(axis=1)
    within = (_family_centred(ranks, codes, n_families) ** 2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - within / total, np.nan)


def _statistics(norms: np.ndarray, variables: np.ndarray, codes: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ρ over all tasks, ρ within family, η² of the norms) for one set of tasks."""
    rn, rv = _ranks(norms), _ranks(variables)
    pooled = _row_corr(rn, rv)
    within = _row_corr(_within_family_ranks(norms, codes, k),
                       _within_family_ranks(variables, codes, k))
    return pooled, within, _eta_squared(rn, codes, k)


def _intervals(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis; NaN where the statistic is undefined in every
    resample (numpy's all-NaN warning silenced: NaN is the answer there)."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(samples, [tail, 100.0 - tail], axis=0)
    return low, high


def task_variables(errors, n_classes=None, n_train=None) -> dict[str, np.ndarray]:
    """The variables a norm might track: the oracle's (best expert's) test error, the mean
    error over the experts, and, when given, the number of classes and training images."""
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 2 or not np.isfinite(err).any(axis=1).all():
        raise ValueError("need a T×E error matrix with at least one observed error per task")
    out = {"oracle error": np.nanmin(err, axis=1), "mean error": np.nanmean(err, axis=1)}
    for name, values in (("classes", n_classes), ("training images", n_train)):
        if values is not None:
            out[name] = np.asarray(values, dtype=np.float64)
            if out[name].shape != (err.shape[0],):
                raise ValueError(f"{name}: need one value per task, got {out[name].shape}")
    return out


def norm_correlates(
    task_embeddings,
    errors,
    families: Sequence[str],
    *,
    n_classes: Sequence[float] | None = None,
    n_train: Sequence[float] | None = None,
    filter_names: Sequence[str] | None = None,
    task_ids: Sequence[str] | None = None,
    depth_groups: int = 2,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> NormCorrelates:
    """Which task variable does the embedding's norm track? Spearman ρ of each norm
    (:func:`embedding_norms`) with each variable (:func:`task_variables`), over all tasks and
    within families, and the family's share of each norm (η² of ranks), every statistic with
    a percentile bootstrap interval over tasks resampled with replacement."""
    norms = embedding_norms(task_embeddings, filter_names, depth_groups)
    variables = task_variables(errors, n_classes, n_train)
    fams = tuple(str(f) for f in families)
    n = len(fams)
    if n < 4 or any(v.shape[0] != n for v in (*norms.values(), *variables.values())):
        raise ValueError("need at least 4 tasks and one family, embedding and error row per task")
    names, codes = np.unique(np.asarray(fams), return_inverse=True)
    k = len(names)
    nv = np.stack(list(norms.values()))
    vv = np.stack(list(variables.values()))
    pooled, within, eta = _statistics(nv, vv, codes, k)
    rng = np.random.default_rng(seed)
    boot = [_statistics(nv[:, i], vv[:, i], codes[i], k)
            for i in rng.integers(0, n, size=(n_boot, n))]
    (p_lo, p_hi), (w_lo, w_hi), (e_lo, e_hi) = (
        _intervals(np.stack([b[j] for b in boot]), confidence) for j in range(3))
    rows = []
    for a, norm in enumerate(norms):
        for b, var in enumerate(variables):
            rows.append(NormCorrelation(norm, var, ALL_TASKS, float(pooled[a, b]),
                                        float(p_lo[a, b]), float(p_hi[a, b])))
            rows.append(NormCorrelation(norm, var, WITHIN_FAMILY, float(within[a, b]),
                                        float(w_lo[a, b]), float(w_hi[a, b])))
    chance = (k - 1) / (n - 1)
    shares = tuple(
        FamilyShare(norm, float(eta[a]), float(e_lo[a]), float(e_hi[a]), chance,
                    {str(f): float(np.median(norms[norm][codes == c])) for c, f in enumerate(names)})
        for a, norm in enumerate(norms))
    between = _row_corr(_ranks(vv), _ranks(vv))
    return NormCorrelates(
        n_tasks=n, confidence=confidence, n_boot=n_boot, correlations=tuple(rows), family=shares,
        between_variables={a: {b: float(between[i, j]) for j, b in enumerate(variables)}
                           for i, a in enumerate(variables)},
        task_ids=tuple(str(t) for t in (task_ids if task_ids is not None else range(n))),
        families=fams, norms=norms, variables=variables)


def norm_correlates_of(data: MetaDataset, tasks: Sequence[TaskSpec] | None = None,
                       **kwargs: Any) -> NormCorrelates:
    """:func:`norm_correlates` of a meta-dataset, with the classes and training images of its
    tasks read from their manifest entries ``tasks`` when given. With a matrix capped at
    ``max_per_class`` images, a task's training images count at most that many per class."""
    n_classes = n_train = None
    if tasks is not None:
        by_id = {t.task_id: t for t in tasks}
        if missing := [t for t in data.task_ids if t not in by_id]:
            raise ValueError(f"no manifest entry for {len(missing)} task(s): {missing[:5]}")
        n_classes = [by_id[t].n_classes for t in data.task_ids]
        n_train = [by_id[t].n_train for t in data.task_ids]
        if data.max_per_class is not None:
            n_train = [min(m, data.max_per_class * c) for m, c in zip(n_train, n_classes, strict=True)]
    return norm_correlates(data.embeddings, data.errors, data.families, n_classes=n_classes,
                           n_train=n_train, filter_names=data.filter_names,
                           task_ids=data.task_ids, **kwargs)
