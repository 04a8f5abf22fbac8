"""Expert selectors behind one interface, so the evaluation treats all of them alike.

The interface (:class:`Selector`):

* ``fit(train_task_embeddings (T×d), train_errors (T×E, NaN = missing),
  expert_source_embeddings (E rows; None/NaN = no source task), expert_ids=None, **context)``
  sees *only* training tasks. Returns ``self``. It checks the shapes and keeps the zoo's
  shape and source embeddings on the selector, then calls ``_fit``, the one method a
  selector that learns from its training tasks overrides.
* ``rank(task_embeddings (n×d), **context) -> (n×E) int array``: expert indices best-first,
  every row a permutation of ``range(E)``.

``context`` carries per-task side information as sequences aligned with the task rows
(item j belongs to task j), so an evaluator can slice it with the same indices as the
embeddings. Keys used here:

* ``features``: per task, a length-E sequence of (N×D) expert feature arrays (LogME);
* ``source_probs``: per task, a length-E sequence of (N×Z) source-head probabilities (LEEP);
* ``source_labels``: per task, a length-E sequence of (N,) hard source predictions (NCE;
  derived from ``source_probs`` by argmax when absent);
* ``labels``: per task, the (N,) target labels of those samples;
* ``families``: per task, its family label (the family-best reference row);
* ``val_errors``: per task, a length-E row of validation errors from training every expert
  on the task (the brute-force search the recommenders are meant to replace);
* ``target_errors``: the true (n×E) errors of the tasks being ranked. Only selectors with
  ``requires_target_errors = True`` (the oracle, the reference of every metric) get it.

Selectors ignore context keys they do not use. ``cost`` says what a selector needs per new
task, since the task-embedding methods and the per-expert scores differ by a factor E.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Self

import numpy as np

from t2v_core.embedding.distance import complexity, d_asym, d_sym, trivial_embedding, trivial_level
from t2v_core.recommend.meta_dataset import place_generic_experts
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR, relative_increase
from t2v_core.recommend.model2vec import FitMemo, Model2Vec, resolve_expert_sources
from t2v_core.recommend.transferability import leep, logme, nce, ridge_loo

__all__ = [
    "AsymTask2VecSelector",
    "BruteForceSelector",
    "ChanceSelector",
    "FamilyBestSelector",
    "GenericSelector",
    "LEEPSelector",
    "LogMESelector",
    "MeanErrorPrior",
    "Model2VecSelector",
    "NCESelector",
    "OracleSelector",
    "RidgeLOOSelector",
    "Selector",
    "Task2VecSelector",
    "TwoStageSelector",
    "hard_predictions",
    "top1_relative_increase",
]

COST_NONE = "none (static prior)"
COST_PROBE = "one probe pass per task"
COST_EXPERTS = "one forward pass of every expert per task"
COST_TRAIN_ALL = "training every expert on the task"


def rank_by_score(scores: np.ndarray, *, higher_is_better: bool) -> np.ndarray:
    """Best-first indices per row; NaN scores go last, ties keep index order."""
    s = np.asarray(scores, dtype=np.float64)
    key = -s if higher_is_better else s.copy()
    key[np.isnan(key)] = np.inf
    return np.argsort(key, axis=-1, kind="stable")


def hard_predictions(source_probs) -> np.ndarray | None:
    """An expert's hard source predictions (argmax of its source-head output), as NCE reads
    them; None stays None (the expert was not run on the task)."""
    return None if source_probs is None else np.asarray(source_probs).argmax(axis=1)


def top1_relative_increase(
    errors: np.ndarray, rankings: np.ndarray, error_floor: float = DEFAULT_ERROR_FLOOR
) -> np.ndarray:
    """Per task: (err of the best-ranked expert with an observed error − best err) / best err.

    NaN for tasks without any observed error. Shared by the evaluation and by selectors that
    tune a hyper-parameter on their training tasks.
    """
    err = np.asarray(errors, dtype=np.float64)
    out = np.full(err.shape[0], np.nan)
    for t in range(err.shape[0]):
        row = err[t]
        observed = np.isfinite(row)
        if not observed.any():
            continue
        ranked = [i for i in rankings[t] if observed[i]]
        best = row[observed].min()
        out[t] = relative_increase(row[ranked[0]], best, error_floor)
    return out


class Selector(ABC):
    """Ranks the experts of a zoo for new tasks; see the module docstring for the contract."""

    name: ClassVar[str] = "selector"
    paper_name: ClassVar[str | None] = None  # row of the paper's Table 1, if any
    cost: ClassVar[str] = COST_PROBE
    requires_target_errors: ClassVar[bool] = False

    def fit(
        self,
        train_task_embeddings,
        train_errors,
        expert_source_embeddings,
        expert_ids: Sequence[Any] | None = None,
        **context: Any,
    ) -> Self:
        """Check the training data, remember the zoo's shape and the experts' source
        embeddings, then learn what the selector learns (:meth:`_fit`)."""
        tasks = np.asarray(train_task_embeddings, dtype=np.float64)
        errors = np.asarray(train_errors, dtype=np.float64)
        if errors.ndim != 2 or errors.shape[0] != tasks.shape[0]:
            raise ValueError(f"need T×E errors for {tasks.shape[0]} tasks, got {errors.shape}")
        self.sources_, self.missing_source_ = resolve_expert_sources(
            expert_source_embeddings, tasks
        )
        self.n_experts_ = self.sources_.shape[0]
        if errors.shape[1] != self.n_experts_:
            raise ValueError(f"errors have {errors.shape[1]} columns, {self.n_experts_} experts")
        self.expert_ids_ = list(range(self.n_experts_)) if expert_ids is None else list(expert_ids)
        self._fit(tasks, errors, expert_source_embeddings, **context)
        return self

    def _fit(  # noqa: B027  (an optional hook: a selector that learns nothing keeps it)
        self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings, **context: Any
    ) -> None:
        """Learn from the training tasks (T×d ``tasks``, T×E ``errors``, both float64) once
        :meth:`fit` has set ``sources_``, ``n_experts_`` and ``expert_ids_``; a selector that
        ranks from those alone learns nothing here."""

    @abstractmethod
    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        """(n×E) expert indices, best first."""

    def predict(self, task_embeddings, **context: Any) -> np.ndarray:
        """The top-ranked expert index per task."""
        return self.rank(task_embeddings, **context)[:, 0]

    def _n_tasks(self, task_embeddings) -> int:
        return np.atleast_2d(np.asarray(task_embeddings)).shape[0]


class ChanceSelector(Selector):
    """A random ranking per task: the floor every selector must clear.

    The permutation is seeded by ``random_state`` and the task's own embedding, so it does not
    depend on which other tasks are ranked in the same call or on the training data.
    """

    name = "chance"
    paper_name = "Chance"
    cost = COST_NONE

    def __init__(self, random_state: int = 0) -> None:
        self.random_state = random_state

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        tasks = np.atleast_2d(np.asarray(task_embeddings, dtype=np.float64))
        out = np.empty((tasks.shape[0], self.n_experts_), dtype=np.int64)
        for j, row in enumerate(tasks):
            seed = np.random.SeedSequence([int(self.random_state), zlib.crc32(row.tobytes())])
            out[j] = np.random.default_rng(seed).permutation(self.n_experts_)
        return out


def _mean_statistic(errors: np.ndarray, statistic: str,
                    error_floor: float = DEFAULT_ERROR_FLOOR) -> np.ndarray:
    """Per-expert mean over training tasks of the raw error, its rank, or relative increase."""
    err = np.asarray(errors, dtype=np.float64)
    if statistic == "error":
        values = err
    elif statistic == "rank":
        key = np.where(np.isfinite(err), err, np.inf)
        values = np.argsort(np.argsort(key, axis=1, kind="stable"), axis=1).astype(np.float64)
        values[~np.isfinite(err)] = np.nan
    elif statistic == "relative":
        best = np.nanmin(np.where(np.isfinite(err), err, np.nan), axis=1, keepdims=True)
        values = relative_increase(err, best, error_floor)
    else:
        raise ValueError(f"statistic must be 'error', 'rank' or 'relative', got {statistic!r}")
    counts = np.isfinite(values).sum(axis=0)
    sums = np.where(np.isfinite(values), values, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class MeanErrorPrior(Selector):
    """Static prior: experts ranked by their mean error on the training tasks.

    It never looks at the new task; on public transferability benchmarks such a prior beats
    several per-task scores, so a recommender that does not beat it is not useful.
    ``statistic`` = "error" (mean test error), "rank" (mean rank per task: insensitive to
    hard tasks dominating the mean) or "relative" (mean relative increase over the best,
    with the evaluation's ``error_floor``).
    """

    name = "mean_error_prior"
    cost = COST_NONE

    def __init__(self, statistic: str = "error", error_floor: float = DEFAULT_ERROR_FLOOR) -> None:
        self.statistic = statistic
        self.error_floor = error_floor

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        self.mean_ = _mean_statistic(errors, self.statistic, self.error_floor)
        self.order_ = rank_by_score(self.mean_, higher_is_better=False)

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        return np.tile(self.order_, (self._n_tasks(task_embeddings), 1))


class GenericSelector(Selector):
    """Static prior: always the generic (e.g. ImageNet) expert first, the rest by mean error.

    ``generic`` is the expert's index or id; by default the (first) expert without a source
    task embedding.
    """

    name = "generic"
    paper_name = "ImageNet"
    cost = COST_NONE

    def __init__(self, generic: Any = None) -> None:
        self.generic = generic

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        if self.generic is None:
            missing = np.flatnonzero(self.missing_source_)
            if missing.size == 0:
                raise ValueError("no expert without a source task: pass generic= explicitly")
            self.generic_index_ = int(missing[0])
        elif self.generic in self.expert_ids_:
            self.generic_index_ = self.expert_ids_.index(self.generic)
        elif isinstance(self.generic, int | np.integer) and 0 <= self.generic < self.n_experts_:
            self.generic_index_ = int(self.generic)
        else:
            raise ValueError(f"unknown generic expert {self.generic!r}")
        rest = rank_by_score(_mean_statistic(errors, "error"), higher_is_better=False)
        self.order_ = np.concatenate([[self.generic_index_], rest[rest != self.generic_index_]])

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        return np.tile(self.order_, (self._n_tasks(task_embeddings), 1))


class Task2VecSelector(Selector):
    """The expert whose source task is nearest to the new task by d_sym (TASK2VEC, symmetric).

    An expert with no source task sits where the training tasks say it wins
    (:func:`~t2v_core.recommend.meta_dataset.place_generic_experts`; the mean training task
    when they say nothing).
    """

    name = "task2vec"
    paper_name = "Task2Vec"

    def __init__(self, error_floor: float = DEFAULT_ERROR_FLOOR) -> None:
        self.error_floor = error_floor

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        self.sources_, _ = place_generic_experts(tasks, errors, self.sources_,
                                                 self.missing_source_, error_floor=self.error_floor)

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        tasks = np.atleast_2d(np.asarray(task_embeddings, dtype=np.float64))
        dist = np.asarray(d_sym(self.sources_, tasks)).reshape(self.n_experts_, -1).T
        return rank_by_score(dist, higher_is_better=False)


class AsymTask2VecSelector(Selector):
    """Experts ranked by d_asym(source → task) = d_sym − α complexity(source, t0) (asymmetric
    TASK2VEC; :func:`~t2v_core.embedding.distance.complexity`).

    α is picked from ``alphas`` on the training tasks: the value whose top pick has the lowest
    mean relative error increase over the best expert (with the evaluation's ``error_floor``;
    ties go to the α nearest the paper's 0.15). Each training task's pick uses only its
    embedding, never its matrix row, so this is a held-out estimate per task; only α and the
    place of an expert without a source task (chosen with it, for each α, by
    :func:`~t2v_core.recommend.meta_dataset.place_generic_experts`) are fitted. t0 is flat at
    ``level``: the prior precision for variational embeddings, by default the training tasks'
    median Fisher value.
    """

    name = "asym_task2vec"
    paper_name = "Asym Task2Vec"

    def __init__(
        self,
        alphas: Sequence[float] = tuple(np.round(np.arange(0.0, 1.01, 0.05), 2)),
        error_floor: float = DEFAULT_ERROR_FLOOR,
        level: float | None = None,
    ) -> None:
        self.alphas = alphas
        self.error_floor = error_floor
        self.level = level

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        level = trivial_level(tasks) if self.level is None else float(self.level)
        self.t0_ = trivial_embedding(tasks.shape[1], level)
        alphas = np.asarray(list(self.alphas), dtype=np.float64)
        if alphas.size == 0:
            raise ValueError("alphas is empty")
        losses, placed = [], []
        for a in alphas:
            sources, _ = place_generic_experts(tasks, errors, self.sources_, self.missing_source_,
                                               alpha=a, t0=self.t0_, error_floor=self.error_floor)
            base = np.asarray(d_sym(sources, tasks)).reshape(self.n_experts_, -1).T  # T×E
            bonus = np.atleast_1d(complexity(sources, self.t0_)).reshape(1, -1)
            ranks = rank_by_score(base - a * bonus, higher_is_better=False)
            rel = top1_relative_increase(errors, ranks, self.error_floor)
            losses.append(np.nanmean(rel) if np.isfinite(rel).any() else np.inf)
            placed.append(sources)
        losses = np.asarray(losses)
        tied = np.flatnonzero(losses <= losses.min() + 1e-12)
        choice = int(tied[np.argmin(np.abs(alphas[tied] - 0.15))])
        self.alpha_ = float(alphas[choice])
        self.sources_ = placed[choice]
        self.alpha_losses_ = dict(zip(alphas.tolist(), losses.tolist(), strict=True))

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        tasks = np.atleast_2d(np.asarray(task_embeddings, dtype=np.float64))
        dist = d_asym(self.sources_, tasks, t0=self.t0_, alpha=self.alpha_)
        return rank_by_score(
            np.asarray(dist).reshape(self.n_experts_, -1).T, higher_is_better=False
        )


class Model2VecSelector(Selector):
    """MODEL2VEC: learned expert embeddings ranked by d_asym (see :class:`Model2Vec`)."""

    name = "model2vec"
    paper_name = "Model2Vec"

    def __init__(self, *, fits: FitMemo | None = None, **model_params: Any) -> None:
        self.model_params = model_params
        self.fits = fits  # shared with the default recommender's rows: one fit per fold

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        if self.fits is not None:
            self.model_ = self.fits.fit(self.model_params, tasks, errors,
                                        expert_source_embeddings, self.expert_ids_)
            return
        self.model_ = Model2Vec(**self.model_params).fit(
            tasks, errors, expert_source_embeddings, expert_ids=self.expert_ids_
        )

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        return self.model_.rank(np.atleast_2d(np.asarray(task_embeddings, dtype=np.float64)))


class OracleSelector(Selector):
    """Ranks by the true errors of the task: the reference, usable only in evaluation."""

    name = "oracle"
    paper_name = None
    cost = "the full matrix row of the task (unavailable in practice)"
    requires_target_errors = True

    def rank(self, task_embeddings, *, target_errors=None, **context: Any) -> np.ndarray:
        if target_errors is None:
            raise ValueError("OracleSelector needs target_errors (the tasks' true matrix rows)")
        err = np.atleast_2d(np.asarray(target_errors, dtype=np.float64))
        if err.shape != (self._n_tasks(task_embeddings), self.n_experts_):
            raise ValueError(f"target_errors has shape {err.shape}")
        return rank_by_score(err, higher_is_better=False)


class FamilyBestSelector(Selector):
    """Knows the task's family and picks what was best for that family: a reference row.

    Experts are ranked by their mean relative error increase on the training tasks of the
    new task's family (all training tasks for a family it has not seen). It is told the one
    thing a task-embedding selector has to infer, so its distance from the oracle is what the
    differences *between* tasks of one family are worth; a recommender near it has learned
    the families and little inside them (context: ``families``, per task).
    """

    name = "family_best"
    paper_name = None
    cost = "the task's family label (unavailable for a truly new task)"

    def __init__(self, error_floor: float = DEFAULT_ERROR_FLOOR) -> None:
        self.error_floor = error_floor

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        families = _families(context, errors.shape[0])
        mean = _mean_statistic(errors, "relative", self.error_floor)
        self.default_order_ = rank_by_score(mean, higher_is_better=False)
        self.orders_ = {
            fam: rank_by_score(_mean_statistic(errors[families == fam], "relative",
                                               self.error_floor), higher_is_better=False)
            for fam in np.unique(families)
        }

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        families = _families(context, self._n_tasks(task_embeddings))
        return np.stack([self.orders_.get(fam, self.default_order_) for fam in families])


def _families(context: dict[str, Any], n: int) -> np.ndarray:
    families = context.get("families")
    if families is None or len(families) != n:
        raise ValueError(f"FamilyBestSelector needs context 'families' for {n} tasks")
    return np.asarray([str(f) for f in families])


class BruteForceSelector(Selector):
    """Trains every expert on the task and keeps the best on a validation split.

    The search that expert recommendation exists to avoid, and the practical ceiling for any
    selector: it differs from the oracle only because a validation split is a noisy stand-in
    for the test set. Where it is far from the oracle, the matrix is too noisy for any
    selector to come close (context: ``val_errors``).
    """

    name = "brute_force"
    paper_name = None
    cost = COST_TRAIN_ALL

    def rank(self, task_embeddings, *, val_errors=None, **context: Any) -> np.ndarray:
        n = self._n_tasks(task_embeddings)
        if val_errors is None:
            raise ValueError("BruteForceSelector needs context 'val_errors' (per task, per expert)")
        err = np.asarray([np.asarray(row, dtype=np.float64) for row in val_errors])
        if err.shape != (n, self.n_experts_):
            raise ValueError(f"val_errors has shape {err.shape}, expected {(n, self.n_experts_)}")
        return rank_by_score(err, higher_is_better=False)  # a missing one ranks last


class _PerExpertScoreSelector(Selector):
    """Ranks experts by a transferability score computed from each expert's outputs on the task."""

    cost = COST_EXPERTS
    context_keys: ClassVar[tuple[str, ...]] = ()
    # Its key in context "transfer_scores" (per task, name -> per-expert scores), where an
    # evaluation that needs the scores more than once keeps them; None: always computed.
    score_name: ClassVar[str | None] = None

    @abstractmethod
    def _score(self, expert_output: Any, labels: np.ndarray) -> float:
        """Score of one expert on one task; higher = better expected transfer."""

    def _outputs(self, context: dict[str, Any], n: int) -> Sequence[Sequence[Any]]:
        key = self.context_keys[0]
        if key not in context:
            raise ValueError(f"{type(self).__name__} needs context {key!r} (per task, per expert)")
        return context[key]

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        n = self._n_tasks(task_embeddings)
        cached = context.get("transfer_scores")
        if self.score_name and cached is not None and len(cached) == n and all(
                self.score_name in row for row in cached):
            scores = np.stack([np.asarray(row[self.score_name], np.float64) for row in cached])
            return rank_by_score(scores, higher_is_better=True)
        outputs = self._outputs(context, n)
        labels = context.get("labels")
        if labels is None or len(labels) != n or len(outputs) != n:
            raise ValueError(
                f"{type(self).__name__} needs per-task outputs and labels for {n} tasks"
            )
        scores = np.full((n, self.n_experts_), np.nan)
        for j in range(n):
            if len(outputs[j]) != self.n_experts_:
                raise ValueError(
                    f"task {j}: outputs for {len(outputs[j])} of {self.n_experts_} experts"
                )
            for i, out in enumerate(outputs[j]):
                if out is not None:  # an expert not run on this task ranks last
                    scores[j, i] = self._score(out, np.asarray(labels[j]))
        return rank_by_score(scores, higher_is_better=True)


class LogMESelector(_PerExpertScoreSelector):
    """Experts ranked by LogME of their features on the task (context: features, labels)."""

    name = "logme"
    context_keys = ("features", "labels")
    score_name = "logme"

    def _score(self, expert_output: Any, labels: np.ndarray) -> float:
        return logme(expert_output, labels)


class LEEPSelector(_PerExpertScoreSelector):
    """Experts ranked by LEEP of their source-head probabilities (context: source_probs, labels)."""

    name = "leep"
    context_keys = ("source_probs", "labels")
    score_name = "leep"

    def _score(self, expert_output: Any, labels: np.ndarray) -> float:
        return leep(expert_output, labels)


class RidgeLOOSelector(_PerExpertScoreSelector):
    """Experts ranked by the leave-one-out error of a ridge probe on their features (context:
    features, labels)."""

    name = "ridge_loo"
    context_keys = ("features", "labels")
    score_name = "ridge"

    def _score(self, expert_output: Any, labels: np.ndarray) -> float:
        return ridge_loo(expert_output, labels)


class NCESelector(_PerExpertScoreSelector):
    """Experts ranked by NCE of their hard source predictions (context: source_labels or
    source_probs, and labels)."""

    name = "nce"
    context_keys = ("source_labels", "labels")

    def _outputs(self, context: dict[str, Any], n: int) -> Sequence[Sequence[Any]]:
        if "source_labels" in context:
            return context["source_labels"]
        if "source_probs" in context:
            return [[hard_predictions(p) for p in task] for task in context["source_probs"]]
        raise ValueError("NCESelector needs context 'source_labels' or 'source_probs'")

    def _score(self, expert_output: Any, labels: np.ndarray) -> float:
        return nce(expert_output, labels)


class TwoStageSelector(Selector):
    """Re-rank the first selector's top ``top`` experts with the second one; keep the rest.

    The cheap-and-strong recipe: a task-embedding selector ranks the whole zoo from one probe
    pass, and a per-expert score (e.g. LogME) needs forward passes of only ``top`` experts.
    """

    name = "two_stage"

    def __init__(self, first: Selector, second: Selector, top: int = 3) -> None:
        self.first = first
        self.second = second
        self.top = top

    @property
    def cost(self) -> str:  # type: ignore[override]
        return f"{self.first.cost}, plus the second stage on {self.top} experts"

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        for stage in (self.first, self.second):
            stage.fit(tasks, errors, expert_source_embeddings, self.expert_ids_, **context)

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        first = self.first.rank(task_embeddings, **context)
        second = self.second.rank(task_embeddings, **context)
        out = first.copy()
        k = max(1, min(int(self.top), self.n_experts_))
        for j in range(first.shape[0]):
            head = set(first[j, :k].tolist())
            out[j, :k] = [i for i in second[j] if i in head]
        return out
