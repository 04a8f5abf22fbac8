"""The cross-validation protocol of Table 1: tasks held out, selectors fitted on the rest.

:func:`evaluate_selectors` holds tasks out (leave-one-task-out, or k-fold over tasks, optionally
repeated with other fold assignments and each task's metrics averaged over the repeats), fits
every selector on the other tasks only and ranks the experts for the held-out ones. The
leakage guard is structural: ``fit`` receives copies of the training rows of the matrix,
``rank`` receives the held-out embeddings and context; the held-out matrix rows reach only
selectors marked ``requires_target_errors`` (the oracle, which defines the metrics).

Each held-out ranking is scored by :mod:`t2v_core.recommend.metrics` and averaged per
meta-task (each family, plus "Mixed" = all tasks). ``views`` restrict that scoring to subsets of
the tasks (e.g. the *novel* tasks, those no expert was trained on) while every selector is still
fitted on all training tasks of a fold: only what is averaged changes, so one run yields every
view. The first view is the headline (``meta_tasks``, ``by_meta_task``, ``expected_chance_pct``).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from t2v_core.recommend.metrics import (
    DEFAULT_ERROR_FLOOR,
    MetaTaskScores,
    aggregate,
    expected_chance,
    mean_over_repeats,
    task_metrics,
)

if TYPE_CHECKING:
    from t2v_core.recommend.selectors import Selector

__all__ = [
    "ALL_TASKS",
    "MIXED",
    "EvaluationResult",
    "SelectorReport",
    "check_ranking",
    "data_efficiency",
    "default_meta_tasks",
    "evaluate_selectors",
    "task_splits",
]

log = logging.getLogger(__name__)

MIXED = "Mixed"
ALL_TASKS = "all"  # the view that scores every task


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
    # view -> meta-task -> scores over the view's tasks of that meta-task; ``by_meta_task`` is
    # the first view's
    by_view: dict[str, dict[str, MetaTaskScores]] = field(default_factory=dict)

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
    # view -> meta-task -> task indices, and the expected chance per view; the first view is
    # what meta_tasks and expected_chance_pct hold
    views: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    expected_chance_by_view: dict[str, dict[str, float]] = field(default_factory=dict)

    def in_view(self, view: str) -> EvaluationResult:
        """This result with ``view`` as its headline: its meta-tasks, scores and chance level."""
        if view not in self.views:
            raise KeyError(f"no view {view!r} (views: {', '.join(self.views)})")
        reports = {name: replace(rep, by_meta_task=rep.by_view[view])
                   for name, rep in self.reports.items()}
        return replace(self, meta_tasks=self.views[view], reports=reports,
                       expected_chance_pct=self.expected_chance_by_view[view])

    def table(self, metric: str = "relative_increase_pct") -> dict[str, dict[str, float]]:
        """selector -> meta-task -> metric value."""
        return {
            name: {mt: getattr(s, metric) for mt, s in rep.by_meta_task.items()}
            for name, rep in self.reports.items()
        }


def task_splits(n_tasks: int, folds: str | int, random_state: int) -> list[np.ndarray]:
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


def check_ranking(name: str, ranking, n: int, n_experts: int) -> np.ndarray:
    """``ranking`` as int64 if it is n rows, each a permutation of the experts; otherwise a
    ValueError naming the selector ``name``, since a broken row would be scored silently."""
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
            rankings[name][test_idx] = check_ranking(name, ranked, test_idx.size, n_experts)
        log.debug("fold %d/%d done (%d held out)", fold + 1, len(splits), test_idx.size)
    return rankings


def default_meta_tasks(families: Sequence[str]) -> dict[str, list[int]]:
    """One meta-task per family, plus "Mixed" with every task."""
    out: dict[str, list[int]] = {}
    for t, fam in enumerate(families):
        out.setdefault(str(fam), []).append(t)
    out[MIXED] = list(range(len(families)))
    return out


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


def _checked_context(context: Mapping[str, Any] | None, n_tasks: int) -> dict[str, Any]:
    """``context`` as a dict, once every value has one item per task and none is the answer."""
    ctx = dict(context or {})
    if "target_errors" in ctx:
        raise ValueError("context must not carry target_errors: only the oracle may read them")
    for key, value in ctx.items():
        if len(value) != n_tasks:
            raise ValueError(f"context {key!r} has {len(value)} items for {n_tasks} tasks")
    return ctx


def _view_groups(groups: dict[str, list[int]], views: Mapping[str, Sequence[int]]
                 ) -> dict[str, dict[str, list[int]]]:
    """view -> meta-task -> the view's tasks in that meta-task (meta-tasks with none left out,
    except Mixed)."""
    out = {}
    for view, members in views.items():
        keep = {int(t) for t in members}
        out[str(view)] = {mt: [t for t in idx if t in keep] for mt, idx in groups.items()}
        out[str(view)] = {mt: idx for mt, idx in out[str(view)].items() if idx or mt == MIXED}
    return out


def _report(name: str, selector: Selector, runs: list[dict[str, np.ndarray]], err: np.ndarray,
            views: dict[str, dict[str, list[int]]], ks: Sequence[int], error_floor: float
            ) -> SelectorReport:
    """One selector's rankings over every repeat, scored per task and per (view, meta-task)."""
    per_task = [
        mean_over_repeats([task_metrics(err[t], run[name][t], ks, error_floor) for run in runs])
        for t in range(err.shape[0])
    ]
    by_view = {view: {mt: aggregate(per_task, idx, ks) for mt, idx in groups.items()}
               for view, groups in views.items()}
    return SelectorReport(
        name=name,
        paper_name=getattr(selector, "paper_name", None),
        cost=str(getattr(selector, "cost", "")),
        by_meta_task=next(iter(by_view.values())),
        by_view=by_view,
        rankings=runs[0][name].tolist(),
        relative_increase_pct=[
            math.nan if m is None else m["relative_increase_pct"] for m in per_task
        ],
    )


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
    error_floor: float = DEFAULT_ERROR_FLOOR,
    random_state: int = 0,
    repeats: int = 1,
    views: Mapping[str, Sequence[int]] | None = None,
) -> EvaluationResult:
    """Evaluate every selector with held-out tasks; see the module docstring.

    ``selectors`` maps a display name to an *unfitted* selector; a fresh copy is fitted per
    fold. ``context`` maps a key to a per-task sequence of length T (sliced per fold).
    ``meta_tasks`` maps a meta-task name to the families it contains (default: one per family;
    "Mixed" with all tasks is always added). ``folds`` is 'loo' or a number of folds.

    ``repeats`` > 1 is repeated k-fold: repeat r splits with seed ``random_state + r`` and each
    task's metrics are averaged over the repeats, since on a few dozen tasks which tasks share
    a fold moves the table by several points. The cost is ``repeats`` times the fitting.

    ``views`` maps a name to the task indices it scores (default: ``{"all": every task}``);
    selectors are fitted on every training task whatever the view.
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
    ctx = _checked_context(context, n_tasks)

    runs = [
        _rank_held_out(selectors, tasks, err, sources, ids, ctx,
                       task_splits(n_tasks, folds, random_state + r))
        for r in range(repeats)
    ]
    by_view = _view_groups(_meta_task_groups(fams, meta_tasks),
                           views or {ALL_TASKS: range(n_tasks)})
    chance = {view: {mt: expected_chance(err, idx, error_floor) for mt, idx in groups.items()}
              for view, groups in by_view.items()}
    headline = next(iter(by_view))
    return EvaluationResult(
        folds=str(folds),
        expert_ids=ids,
        families=fams,
        meta_tasks=by_view[headline],
        reports={name: _report(name, selector, runs, err, by_view, ks, error_floor)
                 for name, selector in selectors.items()},
        expected_chance_pct=chance[headline],
        ks=[int(k) for k in ks],
        repeats=repeats,
        views=by_view,
        expected_chance_by_view=chance,
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
