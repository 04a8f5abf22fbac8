"""The default recommender: MODEL2VEC and a cheap screen shortlist a few experts, and only the
shortlisted experts run over all of the task's images to re-rank it.

Per-expert transferability scores (LogME, LEEP) read each expert's outputs on the new task, so
they cost E expert forward passes per task; MODEL2VEC costs one probe pass and ranks the whole
zoo, but inside a domain it often misses which expert wins. :class:`ShortlistRecommender`
spends a few forward passes where they matter:

1. A first stage ranks every expert: MODEL2VEC's log p(expert | task) from the probe
   embedding, fused with a cheap screen, each expert's LEEP on a few images per class of the
   task (``SCREEN_PER_CLASS``; about a tenth of a pass per expert), as
   ``log p / σ_p + screen_weight · screen / σ_screen`` with σ each term's spread across the
   task's experts. MODEL2VEC alone, trusted for which expert wins inside a
   domain, missed the winner of whole families; the screen catches those.
2. Its top ``k`` experts (fewer with ``mass``, plus the generic experts with
   ``include_generic``) are the shortlist: only they run over all of the task's images, and
   their transfer score re-ranks them: the score set (LogME, LEEP or both) whose own top-1
   is best on the training tasks, or, with
   ``inner_folds`` ≥ 2, by the fusion ``log p / σ_p + w · score / σ_s`` whose score set and w
   inner cross-validation on the training tasks chose (MODEL2VEC refitted without each inner
   fold gives held-out log p). The experts outside the shortlist keep the first stage's order
   below it: an expert that was never fully run cannot move up.

Every ranked task is entered in the selector's :class:`PassLedger`, which deep copies share, so
an evaluation that fits a fresh copy per fold can report the expert forward passes the
recommender actually spent per task (:func:`expert_forward_passes`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from t2v_core.recommend.metrics import relative_increase
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.recommend.selectors import (
    BruteForceSelector,
    FamilyBestSelector,
    OracleSelector,
    Selector,
    _PerExpertScoreSelector,
    rank_by_score,
)
from t2v_core.recommend.transferability import leep, logme

__all__ = [
    "DEFAULT_FUSION",
    "SCORES",
    "FitMemo",
    "Fusion",
    "PassLedger",
    "ShortlistRecommender",
    "expert_forward_passes",
    "screen_context",
    "screen_subset",
    "transfer_scores",
]

log = logging.getLogger(__name__)

# Transfer score -> (context key of the expert outputs it reads, the score function).
SCORES: dict[str, tuple[str, Callable[[Any, np.ndarray], float]]] = {
    "logme": ("features", logme),
    "leep": ("source_probs", leep),
}
# Score sets the fusion may use; "logme+leep" adds both, each scaled by its own spread.
SCORE_SETS: tuple[tuple[str, ...], ...] = (("logme",), ("leep",), ("logme", "leep"))
DEFAULT_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)


class FitMemo:
    """MODEL2VEC fits keyed by their parameters and training data, shared by deep copies:
    Table 1's rows that differ only in the shortlist size fit the same models once."""

    def __init__(self) -> None:
        self._fits: dict[str, Model2Vec] = {}

    def __deepcopy__(self, memo: dict) -> FitMemo:
        return self

    def fit(self, params: dict[str, Any], tasks: np.ndarray, errors: np.ndarray, sources,
            expert_ids: Sequence[Any]) -> Model2Vec:
        digest = hashlib.sha256(repr(sorted(params.items())).encode())
        for part in (tasks, errors, np.asarray(
                [np.full(tasks.shape[1], np.nan) if s is None else s for s in sources], float)):
            digest.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        key = digest.hexdigest()
        if key not in self._fits:
            self._fits[key] = Model2Vec(**params).fit(tasks, errors, sources,
                                                      expert_ids=expert_ids)
        return self._fits[key]


class PassLedger:
    """Tasks ranked and expert forward passes spent, shared by every deep copy of its owner:
    an evaluation fits a fresh copy per fold, and the template's ledger still adds them up."""

    def __init__(self) -> None:
        self.tasks = 0
        self.passes = 0.0

    def __deepcopy__(self, memo: dict) -> PassLedger:
        return self

    def add(self, passes: Sequence[float]) -> None:
        self.tasks += len(passes)
        self.passes += float(sum(passes))

    @property
    def mean(self) -> float:
        """Expert forward passes per ranked task (NaN before any task was ranked)."""
        return self.passes / self.tasks if self.tasks else math.nan


@dataclass(frozen=True)
class Fusion:
    """The re-ranking learned on the training tasks: which scores, their weight, their scales."""

    scores: tuple[str, ...]
    weight: float  # inf: the scores alone, MODEL2VEC only breaks their ties
    scale_p: float  # typical spread of log p(e|t) across experts
    scale_s: tuple[float, ...]  # the same for each score
    inner_loss_pct: float  # mean top-1 relative increase of this choice on the training tasks

    def combine(self, log_p: np.ndarray, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The fused value of each expert (higher = better); NaN where a score is missing."""
        s = sum(scores[n] / c for n, c in zip(self.scores, self.scale_s, strict=True))
        p = log_p / self.scale_p
        if self.weight == 0.0:
            return p + 0.0 * s  # NaN where no score: only scored experts are ranked
        if math.isinf(self.weight):
            return s + 1e-9 * p
        return p + self.weight * s


# What a job that loads a stored MODEL2VEC, with no training tasks' scores at hand, re-ranks
# by: the shortlisted experts by LEEP alone, MODEL2VEC breaking ties.
DEFAULT_FUSION = Fusion(("leep",), math.inf, 1.0, (1.0,), math.nan)


def transfer_scores(context: dict[str, Any], names: Sequence[str], task: int,
                    experts: Sequence[int], n_experts: int) -> dict[str, np.ndarray]:
    """Task ``task``'s scores ``names`` for ``experts`` (NaN for the others), read from
    ``context["transfer_scores"]`` when the caller computed them already, else from the
    experts' outputs (``features`` for LogME, ``source_probs`` for LEEP) and ``labels``."""
    out = {n: np.full(n_experts, np.nan) for n in names}
    cached = context.get("transfer_scores")
    for name in names:
        if cached is not None:
            values = np.asarray(cached[task][name], dtype=np.float64)
            out[name][list(experts)] = values[list(experts)]
            continue
        key, score = SCORES[name]
        if key not in context or "labels" not in context:
            raise ValueError(f"the {name} score needs context {key!r} and 'labels' per task")
        labels = np.asarray(context["labels"][task])
        for e in experts:
            output = context[key][task][e]
            if output is not None:
                out[name][e] = score(output, labels)
    return out


def all_transfer_scores(context: dict[str, Any], names: Sequence[str] = tuple(SCORES)
                        ) -> list[dict[str, np.ndarray]]:
    """Every task's scores for every expert, for ``context["transfer_scores"]``: an evaluation
    computes them once instead of once per fold (a ranked task still reads only its shortlist)."""
    usable = [n for n in names if SCORES[n][0] in context]
    n_tasks = len(context["labels"])
    n_experts = len(context[SCORES[usable[0]][0]][0]) if usable else 0
    return [transfer_scores(context, usable, t, range(n_experts), n_experts)
            for t in range(n_tasks)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def _row_spread(row: np.ndarray) -> float:
    """The std across one task's experts (finite values), 1 where there is none."""
    finite = row[np.isfinite(row)]
    spread = float(finite.std()) if finite.size > 1 else 0.0
    return spread if spread > 0 else 1.0


def _spread(values: np.ndarray) -> float:
    """The mean over tasks of the spread across experts (std), 1 where there is none."""
    with np.errstate(invalid="ignore"):
        per_task = np.nanstd(values, axis=1)
    per_task = per_task[np.isfinite(per_task) & (per_task > 0)]
    return float(per_task.mean()) if per_task.size else 1.0


class ShortlistRecommender(Selector):
    """MODEL2VEC's shortlist, sharpened by a cheap screen, re-ranked by the shortlisted experts'
    transfer scores (module docstring).

    Reads, per training task, every expert's outputs (``features`` and/or ``source_probs``, and
    ``labels``) or their ``transfer_scores``, and the ``screen_scores``; per ranked task, its
    ``screen_scores`` and ``screen_passes`` and the outputs of its shortlist only.

    ``k``: experts on the shortlist; ``mass``: stop earlier once the shortlist holds this share
    of MODEL2VEC's p(expert | task) (None: always k); ``include_generic``: the generic experts
    join every shortlist; ``screen_weight``: weight of the screen beside MODEL2VEC's log p in
    the first stage (inf: the screen alone, MODEL2VEC breaking ties; ignored without screen
    scores); ``inner_folds`` ≥ 2: choose the re-ranking among ``score_sets`` × ``weights`` by
    inner cross-validation on the training tasks, otherwise re-rank by the score set whose own
    top-1 is best on the training tasks; ``fits``: a :class:`FitMemo` shared with other rows; the other keywords go
    to :class:`Model2Vec`.
    """

    name = "shortlist"
    paper_name = None
    # A zoo with fewer training tasks than this fits MODEL2VEC without inner folds.
    min_inner_tasks: ClassVar[int] = 6

    def __init__(self, k: int = 3, *, mass: float | None = None, include_generic: bool = False,
                 screen_weight: float = 4.0,
                 score_sets: Sequence[Sequence[str]] = SCORE_SETS,
                 weights: Sequence[float] = DEFAULT_WEIGHTS, inner_folds: int = 0,
                 error_floor: float = 1e-3, fits: FitMemo | None = None,
                 **model_params: Any) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.mass = mass
        self.include_generic = include_generic
        self.screen_weight = screen_weight
        self.score_sets = score_sets
        self.weights = weights
        self.inner_folds = inner_folds
        self.error_floor = error_floor
        self.model_params = model_params
        self.fits = FitMemo() if fits is None else fits
        self.ledger = PassLedger()

    @property
    def cost(self) -> str:  # type: ignore[override]
        head = f"up to {self.k}" if self.mass is not None else f"{self.k}"
        extra = " (+ the generic experts)" if self.include_generic else ""
        return (f"one probe pass + a screen of every expert on a few images + {head} expert "
                f"forward passes{extra}")

    @classmethod
    def from_model(cls, model: Model2Vec, fusion: Fusion, k: int = 3, *,
                   use_screen: bool = True, **params: Any) -> ShortlistRecommender:
        """A recommender around a fitted MODEL2VEC (the one a job loads) and a given fusion,
        for ranking new tasks without refitting anything."""
        rec = cls(k, **params)
        rec.model_ = model
        rec.expert_ids_ = list(model.expert_ids_)
        rec.n_experts_ = len(rec.expert_ids_)
        rec.missing_source_ = np.asarray(model.missing_source_, dtype=bool)
        rec.generic_ = np.flatnonzero(rec.missing_source_)
        rec.fusion_ = fusion
        rec.use_screen_ = use_screen
        return rec

    # ------------------------------------------------------------------ fitting

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        self.model_ = self.fits.fit(self.model_params, tasks, errors, expert_source_embeddings,
                                    self.expert_ids_)
        self.generic_ = np.flatnonzero(self.missing_source_)
        screens = context.get("screen_scores")
        self.use_screen_ = screens is not None
        sets = [tuple(s) for s in self.score_sets if all(self._has_score(context, n) for n in s)]
        if not sets:
            raise ValueError("ShortlistRecommender needs every training task's expert outputs "
                             "(features or source_probs, and labels) or transfer_scores")
        names = sorted({n for s in sets for n in s})
        everyone = range(self.n_experts_)
        scores = [transfer_scores(context, names, t, everyone, self.n_experts_)
                  for t in range(tasks.shape[0])]
        if self.inner_folds < 2:
            self.fusion_ = self._choose_score(scores, errors, sets,
                                              _spread(self._log_p(self.model_, tasks)))
            return
        log_p = self._held_out_log_p(tasks, errors, expert_source_embeddings)
        self.fusion_ = self._choose_fusion(log_p, scores, errors, sets, screens)
        log.debug("shortlist fusion: %s", self.fusion_)

    @staticmethod
    def _has_score(context: dict[str, Any], name: str) -> bool:
        cached = context.get("transfer_scores")
        if cached is not None:
            return len(cached) > 0 and name in cached[0]
        return SCORES[name][0] in context and "labels" in context

    def _held_out_log_p(self, tasks: np.ndarray, errors: np.ndarray, sources) -> np.ndarray:
        """log p(e|t) of every training task from a MODEL2VEC fitted without its inner fold,
        so that the fusion learns how far MODEL2VEC is to be trusted on tasks it has not seen."""
        n = tasks.shape[0]
        folds = min(self.inner_folds, n)
        if folds < 2 or n < self.min_inner_tasks:
            return self._log_p(self.model_, tasks)
        out = np.empty((n, self.n_experts_))
        seed = int(self.model_params.get("random_state", 0))
        order = np.random.default_rng(seed).permutation(n)
        for held in np.array_split(order, folds):
            keep = np.setdiff1d(np.arange(n), held)
            inner = self.fits.fit(self.model_params, tasks[keep], errors[keep], sources,
                                  self.expert_ids_)
            out[held] = self._log_p(inner, tasks[held])
        return out

    @staticmethod
    def _log_p(model: Model2Vec, tasks: np.ndarray) -> np.ndarray:
        logits = -model.distances(tasks) / model.tau_
        top = logits.max(1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))

    def _choose_score(self, scores: list[dict[str, np.ndarray]], errors: np.ndarray,
                      sets: list[tuple[str, ...]], scale_p: float) -> Fusion:
        """The score set whose own top-1 over every expert has the lowest mean relative
        increase on the training tasks (ties: the first in ``score_sets``), to re-rank with
        alone; MODEL2VEC is not refitted, since the scores do not depend on it."""
        scale = {n: _spread(np.stack([s[n] for s in scores])) for n in scores[0]}
        best: Fusion | None = None
        for names in sets:
            fusion = Fusion(names, math.inf, scale_p, tuple(scale[n] for n in names), 0.0)
            picks = [int(np.argmax(np.nan_to_num(fusion.combine(np.zeros(self.n_experts_), s),
                                                 nan=-np.inf))) for s in scores]
            loss = _mean_top1_increase(errors, picks, self.error_floor)
            if best is None or loss < best.inner_loss_pct - 1e-9:
                best = Fusion(names, math.inf, scale_p, fusion.scale_s, loss)
        assert best is not None
        return best

    def _choose_fusion(self, log_p: np.ndarray, scores: list[dict[str, np.ndarray]],
                       errors: np.ndarray, sets: list[tuple[str, ...]], screens) -> Fusion:
        """The score set and weight whose fused top-1 has the lowest mean relative increase
        on the training tasks (ties: the first tried, i.e. the smaller weight)."""
        scale_p = _spread(log_p)
        scale = {n: _spread(np.stack([s[n] for s in scores])) for n in scores[0]}
        firsts = [self._first(log_p[t], None if screens is None else screens[t])
                  for t in range(len(log_p))]
        heads = [self._head(first, row) for first, row in zip(firsts, log_p, strict=True)]
        best: Fusion | None = None
        for names in sets:
            for w in self.weights:
                fusion = Fusion(names, float(w), scale_p, tuple(scale[n] for n in names), 0.0)
                picks = [self._rerank(firsts[t], log_p[t], heads[t], scores[t], fusion)[0]
                         for t in range(len(heads))]
                loss = _mean_top1_increase(errors, picks, self.error_floor)
                if best is None or loss < best.inner_loss_pct - 1e-9:
                    best = Fusion(names, float(w), scale_p, fusion.scale_s, loss)
        assert best is not None
        return best

    # ------------------------------------------------------------------ ranking

    def _first(self, log_p_row: np.ndarray, screen_row) -> np.ndarray:
        """The first stage: MODEL2VEC's log p, fused with the screen when there is one, each
        divided by its spread across the task's experts (so no training data sets a scale,
        and a job that loads a stored MODEL2VEC ranks exactly as the evaluation did)."""
        if screen_row is None or not self.use_screen_:
            return log_p_row
        screen = np.asarray(screen_row, dtype=np.float64)
        if math.isinf(self.screen_weight):
            return np.where(np.isfinite(screen), screen, -np.inf) + 1e-9 * log_p_row
        fused = (log_p_row / _row_spread(log_p_row)
                 + self.screen_weight * screen / _row_spread(screen))
        return np.where(np.isfinite(fused), fused, -np.inf)

    def _head(self, first_row: np.ndarray, log_p_row: np.ndarray) -> np.ndarray:
        """The shortlist of one task, in the first stage's order."""
        order = np.argsort(-first_row, kind="stable")
        size = min(self.k, order.size)
        if self.mass is not None:
            held = np.cumsum(_softmax(log_p_row)[order])
            size = min(size, int(np.searchsorted(held, self.mass)) + 1)
        head = order[:size]
        if self.include_generic:
            head = order[np.isin(order, np.union1d(head, self.generic_))]
        return head

    def _rerank(self, first_row: np.ndarray, log_p_row: np.ndarray, head: np.ndarray,
                scores: dict[str, np.ndarray], fusion: Fusion) -> np.ndarray:
        """The shortlist by its fused value, then everyone else in the first stage's order."""
        fused = fusion.combine(log_p_row, scores)[head]
        ranked_head = head[rank_by_score(fused, higher_is_better=True)]
        order = np.argsort(-first_row, kind="stable")
        return np.concatenate([ranked_head, order[~np.isin(order, head)]])

    def log_p(self, task_embeddings) -> np.ndarray:
        """MODEL2VEC's log p(expert | task) for every task (n×E)."""
        return self._log_p(self.model_, np.atleast_2d(np.asarray(task_embeddings, np.float64)))

    def first_stage(self, task_embeddings, screen_scores=None) -> np.ndarray:
        """The first stage's value of every expert for every task (n×E, higher = better)."""
        log_p = self.log_p(task_embeddings)
        screens = [None] * len(log_p) if screen_scores is None else screen_scores
        return np.stack([self._first(row, s) for row, s in zip(log_p, screens, strict=True)])

    def shortlist(self, task_embeddings, screen_scores=None) -> list[np.ndarray]:
        """The experts to run on each task, in the first stage's order."""
        first = self.first_stage(task_embeddings, screen_scores)
        return [self._head(f, row) for f, row in zip(first, self.log_p(task_embeddings),
                                                     strict=True)]

    def rerank(self, task_embeddings, scores: Sequence[dict[str, np.ndarray]],
               screen_scores=None) -> np.ndarray:
        """(n×E) rankings given each task's transfer scores of its shortlisted experts
        (``scores[j][name]``: length E, NaN for the experts not run)."""
        log_p = self.log_p(task_embeddings)
        first = self.first_stage(task_embeddings, screen_scores)
        rankings = [self._rerank(f, row, self._head(f, row), s, self.fusion_)
                    for f, row, s in zip(first, log_p, scores, strict=True)]
        return np.stack(rankings) if rankings else np.zeros((0, self.n_experts_), np.int64)

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        screens = context.get("screen_scores") if self.use_screen_ else None
        heads = self.shortlist(task_embeddings, screens)
        scores = [transfer_scores(context, self.fusion_.scores, j, head, self.n_experts_)
                  for j, head in enumerate(heads)]
        screened = context.get("screen_passes") if screens is not None else None
        self.ledger.add([h.size + (0.0 if screened is None else float(screened[j]))
                         for j, h in enumerate(heads)])
        return self.rerank(task_embeddings, scores, screens)


def _mean_top1_increase(errors: np.ndarray, picks: Sequence[int], floor: float) -> float:
    """Mean relative increase (percent) of each task's pick over its best observed error;
    a pick with no observed error counts as the task's worst expert."""
    values = []
    for row, pick in zip(errors, picks, strict=True):
        observed = row[np.isfinite(row)]
        if observed.size == 0:
            continue
        err = row[pick] if np.isfinite(row[pick]) else observed.max()
        values.append(100.0 * relative_increase(err, observed.min(), floor))
    return float(np.mean(values)) if values else math.nan


def expert_forward_passes(selector: Selector, n_experts: int) -> float:
    """Expert forward passes a selector spends per new task: what its ledger counted for the
    shortlist recommender, E for the per-expert scores, 0 for selectors that read only the
    task's embedding or nothing; inf for brute force (it trains every expert, which costs more
    than any forward pass), NaN for reference rows that read what a new task lacks."""
    ledger = getattr(selector, "ledger", None)
    if isinstance(ledger, PassLedger):
        return ledger.mean
    if isinstance(selector, _PerExpertScoreSelector):
        return float(n_experts)
    if isinstance(selector, BruteForceSelector):
        return math.inf
    if isinstance(selector, OracleSelector | FamilyBestSelector):
        return math.nan
    return 0.0


DEFAULT_KS: tuple[int, ...] = (1, 3, 5)
SCREEN_PER_CLASS = 3  # images per class each expert's screen reads: about a tenth of a task


def screen_subset(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_class`` samples of each class, drawn with a seed per class."""
    labels = np.asarray(labels)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), int(zlib.crc32(str(c).encode()))])
        keep.append(members[rng.permutation(members.size)[:per_class]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def screen_context(context: dict[str, Any], per_class: int = SCREEN_PER_CLASS, seed: int = 0
                   ) -> dict[str, list]:
    """The screen of every task: each expert's LEEP on at most ``per_class`` of the task's
    training images per class (``screen_scores``, NaN for an expert without outputs), and its
    cost in expert forward passes (``screen_passes``: experts × images screened / images).
    Computed from the experts' outputs on the whole split, which on the screened images are
    exactly what a pass over those images alone gives; empty without ``source_probs``."""
    if "source_probs" not in context or "labels" not in context:
        return {}
    scores, passes = [], []
    for probs, labels in zip(context["source_probs"], context["labels"], strict=True):
        y = np.asarray(labels)
        idx = screen_subset(y, per_class, seed)
        scores.append(np.asarray([np.nan if p is None else leep(np.asarray(p)[idx], y[idx])
                                  for p in probs]))
        passes.append(len(probs) * idx.size / max(y.size, 1))
    return {"screen_scores": scores, "screen_passes": passes}


def default_recommenders(context: dict | None, *, ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
                         model2vec_epochs: int = 300, error_floor: float = 1e-3
                         ) -> dict[str, ShortlistRecommender]:
    """The default recommender at each shortlist size in ``ks``, as Table 1 names its rows;
    none when ``context`` lacks the experts' outputs the re-ranking reads."""
    if not context or not any(SCORES[n][0] in context for n in SCORES) or "labels" not in context:
        return {}
    fits = FitMemo()
    return {f"Shortlist k={k}": ShortlistRecommender(
        k, error_floor=error_floor, fits=fits, max_epochs=model2vec_epochs, random_state=seed)
        for k in ks}


def with_screen(context: dict[str, Any]) -> dict[str, Any]:
    """``context`` plus what the default recommender reads: every expert's transfer scores
    (computed once, not once per fold; a ranked task reads only its shortlist's) and the
    screen."""
    return {**context, "transfer_scores": all_transfer_scores(context),
            **screen_context(context)}
