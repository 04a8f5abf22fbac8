"""Meta-task evaluation of expert selectors (the paper's Table 1), and embedding diagnostics.

:func:`evaluate_selectors` holds tasks out (leave-one-task-out, or k-fold over tasks, optionally
repeated with other fold assignments and each task's metrics averaged over the repeats), fits
every selector on the other tasks only and ranks the experts for the held-out ones. The
leakage guard is structural: ``fit`` receives copies of the training rows of the matrix,
``rank`` receives the held-out embeddings and context; the held-out matrix rows reach only
selectors marked ``requires_target_errors`` (the oracle, which defines the metrics).

Metrics per task, averaged per meta-task (each family, plus "Mixed" = all tasks):

* relative error increase of the picked expert over the oracle's, in percent,
  (err_picked − err_oracle) / err_oracle — the paper's Table 1;
* top-1 hit rate (the pick has the best error, ties included);
* best-of-top-k regret: the relative increase of the best expert among the top k;
* Kendall τ and weighted Kendall τ (``scipy.stats.weightedtau``, default hyperbolic weigher,
  which stresses the top of the ranking) between the predicted and the true ranking.

Missing matrix cells (NaN) are skipped: a ranking is scored by its experts with an observed
error, in the order given. The oracle error is floored at ``error_floor`` in denominators, so
a task some expert solves perfectly does not divide by zero.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from t2v_core.embedding import distance as _distance

if TYPE_CHECKING:
    from t2v_core.recommend.selectors import Selector

__all__ = [
    "PAPER_TABLE1",
    "EvaluationResult",
    "FamilyRecovery",
    "MetaTaskScores",
    "NormDifficulty",
    "SelectorReport",
    "SyntheticZoo",
    "bootstrap_mean_ci",
    "data_efficiency",
    "data_efficiency_markdown",
    "evaluate_selectors",
    "family_recovery",
    "folds_label",
    "norm_vs_difficulty",
    "synthetic_zoo",
    "task_metrics",
    "to_json",
    "to_markdown",
]

log = logging.getLogger(__name__)

MIXED = "Mixed"
# Achille et al. 2019, Table 1: relative error increase over the oracle expert, in percent.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Chance": {"iNat+CUB": 59.52, MIXED: 112.49},
    "ImageNet": {"iNat+CUB": 30.18, MIXED: 75.73},
    "Task2Vec": {"iNat+CUB": 42.54, MIXED: 40.30},
    "Asym Task2Vec": {"iNat+CUB": 9.97, MIXED: 29.23},
    "Model2Vec": {"iNat+CUB": 6.81, MIXED: 27.81},
}


# --------------------------------------------------------------------------- results


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


@dataclass
class SelectorReport:
    """Everything measured for one selector: per meta-task scores and per-task outcomes."""

    name: str
    paper_name: str | None
    cost: str
    by_meta_task: dict[str, MetaTaskScores]
    # T×E, best first, as the selector returned them; with repeated k-fold, the first
    # repeat's (a ranking is not averaged), while the metrics average over the repeats.
    rankings: list[list[int]]
    relative_increase_pct: list[float]  # per task, mean over repeats; NaN: no observed error

    def picks(self) -> np.ndarray:
        """The top-ranked expert index per task."""
        return np.asarray([r[0] for r in self.rankings], dtype=np.int64)


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate_selectors`."""

    folds: str
    expert_ids: list[Any]
    families: list[str]
    meta_tasks: dict[str, list[int]]  # meta-task -> task indices
    reports: dict[str, SelectorReport]
    expected_chance_pct: dict[str, float]  # mean relative increase of a uniformly random pick
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    repeats: int = 1  # fold assignments each task's metrics are averaged over

    def table(self, metric: str = "relative_increase_pct") -> dict[str, dict[str, float]]:
        """selector -> meta-task -> metric value."""
        return {
            name: {mt: getattr(s, metric) for mt, s in rep.by_meta_task.items()}
            for name, rep in self.reports.items()
        }


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


# --------------------------------------------------------------------------- metrics


def task_metrics(
    errors_row, ranking, ks: Sequence[int] = (1, 3, 5), error_floor: float = 1e-3
) -> dict[str, Any] | None:
    """Metrics of one ranking on one task's matrix row; None if the row has no observed error."""
    err = np.asarray(errors_row, dtype=np.float64)
    observed = np.isfinite(err)
    if not observed.any():
        return None
    ranked = np.asarray([i for i in ranking if observed[i]], dtype=np.int64)
    best = err[observed].min()
    denom = max(best, error_floor)
    picked = err[ranked[0]]
    regrets = {int(k): 100.0 * (err[ranked[:k]].min() - best) / denom for k in ks}
    if ranked.size >= 2 and np.ptp(err[ranked]) > 0:
        predicted = -np.arange(ranked.size, dtype=np.float64)  # higher = ranked better
        truth = -err[ranked]
        kt = float(stats.kendalltau(predicted, truth).statistic)
        wt = float(stats.weightedtau(predicted, truth).statistic)
    else:
        kt = wt = math.nan  # a ranking of equal errors has no order to recover
    return {
        "relative_increase_pct": 100.0 * (picked - best) / denom,
        "hit": bool(picked <= best + 1e-12),
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


def _mean_over_repeats(runs: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One task's metrics averaged over repeated fold assignments (NaN-aware; ``hit`` becomes
    a rate). None when the task has no observed error, which holds for every repeat alike."""
    rows = [r for r in runs if r is not None]
    if not rows:
        return None
    mean = {key: _nanmean([float(r[key]) for r in rows])
            for key in ("relative_increase_pct", "hit", "kendall_tau", "weighted_tau")}
    mean["regret_at_k_pct"] = {
        k: _nanmean([r["regret_at_k_pct"][k] for r in rows]) for k in rows[0]["regret_at_k_pct"]
    }
    return mean


def _aggregate(
    per_task: list[dict[str, Any] | None], idx: Sequence[int], ks: Sequence[int]
) -> MetaTaskScores:
    rows = [per_task[i] for i in idx if per_task[i] is not None]
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
    )


def _expected_chance(errors: np.ndarray, idx: Sequence[int], error_floor: float) -> float:
    """Mean relative increase of a uniformly random expert: the exact chance level."""
    values = []
    for t in idx:
        row = errors[t][np.isfinite(errors[t])]
        if row.size:
            values.append(100.0 * np.mean((row - row.min()) / max(row.min(), error_floor)))
    return float(np.mean(values)) if values else math.nan


# --------------------------------------------------------------------------- evaluation


def _splits(n_tasks: int, folds: str | int, random_state: int) -> list[np.ndarray]:
    """Held-out index sets: one per task ('loo') or k shuffled folds over tasks."""
    if folds == "loo":
        return [np.array([t]) for t in range(n_tasks)]
    k = int(folds)
    if not 2 <= k <= n_tasks:
        raise ValueError(f"folds must be 'loo' or an int in [2, {n_tasks}], got {folds!r}")
    order = np.random.default_rng(random_state).permutation(n_tasks)
    return [np.sort(part) for part in np.array_split(order, k)]


def _slice_context(context: Mapping[str, Any], idx: np.ndarray) -> dict[str, Any]:
    """The per-task context values of the tasks in ``idx``."""
    out = {}
    for key, value in context.items():
        if isinstance(value, np.ndarray):
            out[key] = value[idx]
        else:
            out[key] = [value[i] for i in idx]
    return out


def _check_ranking(name: str, ranking: np.ndarray, n: int, n_experts: int) -> np.ndarray:
    r = np.asarray(ranking)
    if r.shape != (n, n_experts):
        raise ValueError(f"selector {name!r} returned shape {r.shape}, expected {(n, n_experts)}")
    if not (np.sort(r, axis=1) == np.arange(n_experts)).all():
        raise ValueError(f"selector {name!r} returned rows that are not permutations of experts")
    return r.astype(np.int64)


def _rank_held_out(
    selectors: Mapping[str, Selector],
    tasks: np.ndarray,
    err: np.ndarray,
    sources: list,
    ids: list,
    ctx: dict[str, Any],
    splits: list[np.ndarray],
) -> dict[str, np.ndarray]:
    """Every selector's T×E rankings, each task ranked by a fresh copy fitted without its fold."""
    n_tasks, n_experts = err.shape
    rankings = {name: np.full((n_tasks, n_experts), -1, dtype=np.int64) for name in selectors}
    for fold, test_idx in enumerate(splits):
        train_idx = np.setdiff1d(np.arange(n_tasks), test_idx)
        train_ctx, test_ctx = _slice_context(ctx, train_idx), _slice_context(ctx, test_idx)
        for name, template in selectors.items():
            selector = copy.deepcopy(template)
            # Copies: a selector can neither see nor alter the held-out rows.
            selector.fit(tasks[train_idx].copy(), err[train_idx].copy(), sources, ids, **train_ctx)
            kwargs = dict(test_ctx)
            if getattr(selector, "requires_target_errors", False):
                kwargs["target_errors"] = err[test_idx].copy()
            ranked = selector.rank(tasks[test_idx].copy(), **kwargs)
            rankings[name][test_idx] = _check_ranking(name, ranked, test_idx.size, n_experts)
        log.debug("fold %d/%d done (%d held out)", fold + 1, len(splits), test_idx.size)
    return rankings


def _meta_task_groups(
    fams: list[str], meta_tasks: Mapping[str, Sequence[str]] | None
) -> dict[str, list[int]]:
    """Meta-task -> task indices; "Mixed" (every task) is always there."""
    if meta_tasks is None:
        return default_meta_tasks(fams)
    groups = {
        mt: [t for t, fam in enumerate(fams) if fam in {str(f) for f in members}]
        for mt, members in meta_tasks.items()
    }
    groups[MIXED] = list(range(len(fams)))
    return groups


def default_meta_tasks(families: Sequence[str]) -> dict[str, list[int]]:
    """One meta-task per family, plus "Mixed" with every task."""
    out: dict[str, list[int]] = {}
    for t, fam in enumerate(families):
        out.setdefault(str(fam), []).append(t)
    out[MIXED] = list(range(len(families)))
    return out


def evaluate_selectors(
    selectors: Mapping[str, Selector],
    task_embeddings,
    errors,
    expert_source_embeddings,
    expert_ids: Sequence[Any] | None = None,
    families: Sequence[str] | None = None,
    *,
    folds: str | int = "loo",
    context: Mapping[str, Any] | None = None,
    meta_tasks: Mapping[str, Sequence[str]] | None = None,
    ks: Sequence[int] = (1, 3, 5),
    error_floor: float = 1e-3,
    random_state: int = 0,
    repeats: int = 1,
) -> EvaluationResult:
    """Evaluate every selector with held-out tasks; see the module docstring for the metrics.

    ``selectors`` maps a display name to an *unfitted* selector; a fresh copy is fitted per
    fold. ``context`` maps a key to a per-task sequence of length T (sliced per fold).
    ``meta_tasks`` maps a meta-task name to the families it contains (default: one per family;
    "Mixed" with all tasks is always added). ``folds`` is 'loo' or a number of folds.

    ``repeats`` > 1 is repeated k-fold: repeat r splits with seed ``random_state + r`` and each
    task's metrics are averaged over the repeats, since on a few dozen tasks which tasks share
    a fold moves the table by several points. The cost is ``repeats`` times the fitting.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if folds == "loo" and repeats > 1:
        raise ValueError("leave-one-task-out has no random split to repeat: use repeats=1")
    tasks = np.asarray(task_embeddings, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    n_tasks, n_experts = err.shape
    if tasks.shape[0] != n_tasks:
        raise ValueError(f"{tasks.shape[0]} embeddings for {n_tasks} matrix rows")
    fams = ["all"] * n_tasks if families is None else [str(f) for f in families]
    if len(fams) != n_tasks:
        raise ValueError(f"{len(fams)} families for {n_tasks} tasks")
    ids = list(range(n_experts)) if expert_ids is None else list(expert_ids)
    sources = list(expert_source_embeddings)
    ctx = dict(context or {})
    if "target_errors" in ctx:
        raise ValueError("context must not carry target_errors: only the oracle may read them")
    for key, value in ctx.items():
        if len(value) != n_tasks:
            raise ValueError(f"context {key!r} has {len(value)} items for {n_tasks} tasks")

    runs = [
        _rank_held_out(selectors, tasks, err, sources, ids, ctx,
                       _splits(n_tasks, folds, random_state + r))
        for r in range(repeats)
    ]
    groups = _meta_task_groups(fams, meta_tasks)
    reports = {}
    for name, selector in selectors.items():
        per_task = [
            _mean_over_repeats([task_metrics(err[t], run[name][t], ks, error_floor)
                                for run in runs])
            for t in range(n_tasks)
        ]
        reports[name] = SelectorReport(
            name=name,
            paper_name=getattr(selector, "paper_name", None),
            cost=str(getattr(selector, "cost", "")),
            by_meta_task={mt: _aggregate(per_task, idx, ks) for mt, idx in groups.items()},
            rankings=runs[0][name].tolist(),
            relative_increase_pct=[
                math.nan if m is None else m["relative_increase_pct"] for m in per_task
            ],
        )
    return EvaluationResult(
        folds=str(folds),
        expert_ids=ids,
        families=fams,
        meta_tasks=groups,
        reports=reports,
        expected_chance_pct={
            mt: _expected_chance(err, idx, error_floor) for mt, idx in groups.items()
        },
        ks=[int(k) for k in ks],
        repeats=repeats,
    )


def data_efficiency(
    selectors: Mapping[str, Selector],
    zoos: Mapping[Any, tuple],
    expert_source_embeddings,
    expert_ids: Sequence[Any] | None = None,
    families: Sequence[str] | None = None,
    *,
    contexts: Mapping[Any, Mapping[str, Any] | None] | None = None,
    **kwargs: Any,
) -> dict[Any, EvaluationResult]:
    """One evaluation per training-set size.

    ``zoos`` maps a size (e.g. samples per task) to ``(task_embeddings, errors)`` or
    ``(task_embeddings, errors, expert_source_embeddings)`` measured at that size.
    ``contexts`` maps every size to the ``context`` measured at that size (see
    :func:`evaluate_selectors`), since a transferability score at a size must read that
    size's images; ``context=`` instead gives every size the same one.
    """
    if contexts is not None:
        if "context" in kwargs:
            raise ValueError("pass context (one for every size) or contexts (per size), not both")
        if missing := [size for size in zoos if size not in contexts]:
            raise ValueError(f"contexts has no context for size(s) {missing}")
    out = {}
    for size, zoo in zoos.items():
        embeddings, errors = zoo[0], zoo[1]
        sources = zoo[2] if len(zoo) > 2 else expert_source_embeddings
        at_size = kwargs if contexts is None else {**kwargs, "context": contexts[size]}
        out[size] = evaluate_selectors(
            selectors, embeddings, errors, sources, expert_ids, families, **at_size
        )
    return out


# --------------------------------------------------------------------------- diagnostics


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


# --------------------------------------------------------------------------- reporting


def folds_label(folds: str | int, repeats: int = 1) -> str:
    """How tasks were held out, as report headers state it: "folds=5" or "folds=5, 3 repeats"."""
    return f"folds={folds}" + (f", {repeats} repeats" if repeats > 1 else "")


def _fmt(value: float, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"+{value:.2f}%" if pct else f"{value:.3f}"


def to_markdown(result: EvaluationResult, paper: bool = True) -> str:
    """Table-1 style Markdown: relative error increase per meta-task, plus ranking metrics.

    With ``paper=True`` the paper's numbers sit next to the rows that correspond to its
    selectors (matched through each selector's ``paper_name``).
    """
    metas = list(result.meta_tasks)
    header = ["selector", "cost", *metas]
    paper_cols = list(next(iter(PAPER_TABLE1.values()))) if paper else []
    header += [f"paper {c}" for c in paper_cols]
    lines = [
        "Relative error increase over the oracle expert (mean over held-out tasks, "
        f"{folds_label(result.folds, result.repeats)}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name, rep in result.reports.items():
        cells = [name, rep.cost]
        cells += [_fmt(rep.by_meta_task[m].relative_increase_pct) for m in metas]
        row_paper = PAPER_TABLE1.get(rep.paper_name or "", {})
        cells += [_fmt(row_paper[c]) if c in row_paper else "" for c in paper_cols]
        lines.append("| " + " | ".join(cells) + " |")
    chance = ["expected chance", "exact", *(_fmt(result.expected_chance_pct[m]) for m in metas)]
    chance += [""] * len(paper_cols)
    lines.append("| " + " | ".join(chance) + " |")
    n_tasks = {m: len(idx) for m, idx in result.meta_tasks.items()}
    lines += ["", "Tasks per meta-task: " + ", ".join(f"{m} {n}" for m, n in n_tasks.items()), ""]

    ks = result.ks
    head2 = ["selector", "95% CI (bootstrap over tasks)", "top-1 hit",
             *(f"regret@{k}" for k in ks), "Kendall τ", "weighted τ"]
    lines += [
        f"Ranking quality on {MIXED} (regret = relative increase of the best of the top k; the "
        "interval is that of the relative increase, i.e. of regret@1):",
        "",
        "| " + " | ".join(head2) + " |",
        "|" + "|".join("---" for _ in head2) + "|",
    ]
    for name, rep in result.reports.items():
        s = rep.by_meta_task[MIXED]
        low, high = s.relative_increase_ci95_pct
        cells = [name, f"{_fmt(low)} … {_fmt(high)}", _fmt(s.top1_hit_rate, pct=False)]
        cells += [_fmt(s.regret_at_k_pct[k]) for k in ks]
        cells += [_fmt(s.kendall_tau, pct=False), _fmt(s.weighted_tau, pct=False)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_EFFICIENCY_TITLES = {
    "relative_increase_pct": "Relative error increase over the oracle",
    "top1_hit_rate": "Top-1 hit rate",
    "kendall_tau": "Kendall τ",
    "weighted_tau": "Weighted Kendall τ",
}


def data_efficiency_markdown(
    results: Mapping[Any, EvaluationResult],
    meta_task: str = MIXED,
    metric: str = "relative_increase_pct",
) -> str:
    """One table: rows = selectors, columns = training-set sizes, cells = ``metric`` (a scalar
    field of :class:`MetaTaskScores`; percentages for the relative increase)."""
    sizes = list(results)
    names = list(next(iter(results.values())).reports) if results else []
    header = ["selector", *(str(s) for s in sizes)]
    title = _EFFICIENCY_TITLES.get(metric, metric)
    lines = [
        f"{title} on {meta_task}, by training-set size.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    pct = metric.endswith("_pct")
    for name in names:
        cells = [name] + [
            _fmt(getattr(results[s].reports[name].by_meta_task[meta_task], metric), pct=pct)
            for s in sizes
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None and numpy -> Python, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(result: EvaluationResult | NormDifficulty | FamilyRecovery, **dumps_kwargs: Any) -> str:
    """Strict JSON of a result dataclass (NaN becomes null)."""
    return json.dumps(_jsonable(asdict(result)), allow_nan=False, **dumps_kwargs)


# --------------------------------------------------------------------------- synthetic zoo


@dataclass
class SyntheticZoo:
    """A small zoo with known structure, for tests and demos."""

    task_embeddings: np.ndarray  # T×d, non-negative
    errors: np.ndarray  # T×E test errors (NaN = missing cell)
    expert_source_embeddings: list[np.ndarray | None]  # None for the generic expert
    expert_ids: list[str]
    families: list[str]  # per task
    expert_families: list[str | None]  # per expert; None for the generic expert
    generic_index: int | None
    context: dict[str, list[Any]]  # per-task transferability inputs (empty if n_samples=0)


def synthetic_zoo(
    n_clusters: int = 4,
    tasks_per_cluster: int = 10,
    experts_per_cluster: int = 2,
    dim: int = 64,
    *,
    generic: bool = True,
    spread: float = 0.3,
    mismatch_gap: float = 1.5,
    generic_gap: float = 0.8,
    within_weight: float = 0.4,
    expert_quality: float = 0.1,
    source_noise: float = 0.0,
    noise: float = 0.03,
    missing_fraction: float = 0.0,
    n_samples: int = 0,
    random_state: int = 0,
) -> SyntheticZoo:
    """Tasks in ``n_clusters`` families of log-normal Fisher profiles, experts trained on one
    source task per family, and errors that make each expert best on its own family.

    A task's error with expert e is base_t · (1 + r_te + noise), where base_t grows with the
    task's embedding scale (harder tasks have larger Fisher norms), and r_te is
    ``mismatch_gap`` for an expert of another family, ``within_weight`` × the normalised
    d_sym between the expert's source and the task within the family minus the expert's
    own quality (std ``expert_quality``, invisible in its source embedding), and
    ``generic_gap`` for the generic expert (moderately good everywhere). The source
    embeddings handed out are measured with multiplicative log-normal noise
    ``source_noise``, so nearest-source selection is imperfect while the matrix still
    reflects where each expert truly sits — what MODEL2VEC's offsets can learn.
    With ``n_samples`` > 0, ``context``
    holds per-task labels and per-expert features / source-head probabilities whose quality
    follows the noiseless r_te, for the LogME/LEEP/NCE selectors.
    """
    rng = np.random.default_rng(random_state)
    centers = np.exp(rng.normal(0.0, 1.0, size=(n_clusters, dim)))

    def sample(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        scale = np.exp(rng.normal(0.0, 0.3, size=(n, 1)))
        return centers[k] * np.exp(rng.normal(0.0, spread, size=(n, dim))) * scale, scale[:, 0]

    task_parts, scales, families = [], [], []
    for k in range(n_clusters):
        emb, sc = sample(k, tasks_per_cluster)
        task_parts.append(emb)
        scales.append(sc)
        families += [f"family{k}"] * tasks_per_cluster
    tasks = np.concatenate(task_parts)
    scale = np.concatenate(scales)
    task_cluster = np.repeat(np.arange(n_clusters), tasks_per_cluster)

    true_sources, expert_cluster = [], []
    for k in range(n_clusters):
        emb, _ = sample(k, experts_per_cluster)
        true_sources.append(emb)
        expert_cluster += [k] * experts_per_cluster
    src = np.concatenate(true_sources)
    quality = rng.normal(0.0, expert_quality, size=src.shape[0])
    measured = src * np.exp(rng.normal(0.0, source_noise, size=src.shape)) if source_noise else src
    sources: list[np.ndarray | None] = list(measured)
    ids = [f"expert{k}_{j}" for k in range(n_clusters) for j in range(experts_per_cluster)]
    expert_families: list[str | None] = [f"family{k}" for k in expert_cluster]
    generic_index = None
    if generic:
        generic_index = len(sources)
        sources.append(None)
        ids.append("generic")
        expert_families.append(None)

    n_tasks, n_experts = tasks.shape[0], len(sources)
    rel = np.full((n_tasks, n_experts), generic_gap)
    within = np.asarray(_distance.d_sym(src, tasks)).T  # T×E_specialists, true locations
    same = task_cluster[:, None] == np.asarray(expert_cluster)[None, :]
    typical = float(np.median(within[same])) or 1.0
    own = within_weight * within / typical - quality[None, :]
    rel[:, : src.shape[0]] = np.where(same, own, mismatch_gap)
    rel -= rel.min(axis=1, keepdims=True)  # the best expert of each task sits at base_t
    difficulty = 0.1 + 0.3 / (1.0 + np.exp(-2.0 * np.log(scale) + rng.normal(0, 0.3, n_tasks)))
    errors = difficulty[:, None] * (1.0 + rel + noise * np.abs(rng.normal(size=rel.shape)))
    errors = np.minimum(errors, 0.99)
    if missing_fraction > 0:
        holes = rng.random(errors.shape) < missing_fraction
        holes[np.arange(n_tasks), np.argmin(errors, axis=1)] = False  # keep a best cell per task
        errors[holes] = np.nan

    context: dict[str, list[Any]] = {}
    if n_samples > 0:
        context = _synthetic_context(rng, np.exp(-2.0 * rel), n_samples)
    return SyntheticZoo(
        task_embeddings=tasks,
        errors=errors,
        expert_source_embeddings=sources,
        expert_ids=ids,
        families=families,
        expert_families=expert_families,
        generic_index=generic_index,
        context=context,
    )


def _synthetic_context(
    rng: np.random.Generator,
    quality: np.ndarray,
    n_samples: int,
    n_classes: int = 3,
    n_features: int = 8,
    n_source_classes: int = 5,
) -> dict[str, list[Any]]:
    """Labels, features and source-head probabilities whose signal grows with ``quality``."""
    labels, features, probs = [], [], []
    for t in range(quality.shape[0]):
        y = rng.integers(0, n_classes, size=n_samples)
        means = rng.normal(size=(n_classes, n_features))
        mapping = rng.permutation(n_source_classes)[:n_classes]
        task_features, task_probs = [], []
        for q in quality[t]:
            task_features.append(3.0 * q * means[y] + rng.normal(size=(n_samples, n_features)))
            logits = 4.0 * q * np.eye(n_source_classes)[mapping[y]]
            logits = logits + rng.normal(size=(n_samples, n_source_classes))
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            task_probs.append(p / p.sum(axis=1, keepdims=True))
        labels.append(y)
        features.append(task_features)
        probs.append(task_probs)
    return {"labels": labels, "features": features, "source_probs": probs}
