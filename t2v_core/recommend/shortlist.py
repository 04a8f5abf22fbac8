"""The default recommender: a cheap screen, the static prior and MODEL2VEC shortlist a few
experts, and only the shortlisted experts run over all of the task's images to re-rank it.

Per-expert transferability scores (LogME, LEEP, ridge LOO) read each expert's outputs on the
new task, so they cost E expert forward passes per task; MODEL2VEC costs one probe pass and
ranks the whole zoo, but inside a domain it often misses which expert wins.
:class:`ShortlistRecommender` spends a few forward passes where they matter:

1. A first stage ranks every expert from what is cheap: the screen (each expert's LogME and
   LEEP on a few images per class of the task, ``SCREEN_PER_CLASS``, one forward pass over
   those images giving both; about a tenth of a pass per expert), the mean-error prior, and
   ``model2vec_weight`` × MODEL2VEC's log p(expert | task), each z-scored across the task's
   experts. The screen's and the prior's weights are learned on the training tasks
   (:class:`~t2v_core.recommend.fusion.ListwiseFusion`); MODEL2VEC's is fixed, since its log p
   on the tasks it was fitted to is over-confident and would be over-weighted.
2. Its top ``k`` experts (fewer with ``mass``, plus the generic experts with
   ``include_generic``) are the shortlist: only they run over all of the task's images, and
   a second fusion learned on the training tasks, of their ridge LOO, LEEP and the prior,
   re-ranks them. Learned weights instead of one chosen score: which score is best changes
   with the image size and flips between folds when they are close. Ridge LOO rather than
   LogME: both read the features through a linear model, but the probe's held-out error
   ranked the matrix's errors better than its evidence (weighted τ) in every demo zoo, at
   both image sizes, and LogME beside it added nothing measurable. The experts outside
   the shortlist keep the first stage's order below it: an expert that was never fully run
   cannot move up.

Every ranked task is entered in the selector's :class:`PassLedger`, which deep copies share, so
an evaluation that fits a fresh copy per fold can report the expert forward passes the
recommender actually spent per task (:func:`expert_forward_passes`).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from t2v_core.recommend.fusion import ListwiseFusion, mean_error_prior, zscore
from t2v_core.recommend.model2vec import FitMemo, Model2Vec
from t2v_core.recommend.selectors import (
    BruteForceSelector,
    FamilyBestSelector,
    OracleSelector,
    Selector,
    _PerExpertScoreSelector,
    rank_by_score,
)
from t2v_core.recommend.transferability import leep, logme, ridge_loo

__all__ = [
    "DEFAULT_FIRST",
    "DEFAULT_RERANK",
    "SCORES",
    "SCREEN_SCORES",
    "FitMemo",
    "PassLedger",
    "ShortlistRecommender",
    "expert_forward_passes",
    "screen_context",
    "screen_subset",
    "screen_value",
    "transfer_scores",
]

log = logging.getLogger(__name__)

# Transfer score -> (context key of the expert outputs it reads, the score function).
SCORES: dict[str, tuple[str, Callable[[Any, np.ndarray], float]]] = {
    "logme": ("features", logme),
    "leep": ("source_probs", leep),
    "ridge": ("features", ridge_loo),
}
# The scores the screen reads on its few images per class (:func:`screen_value`).
SCREEN_SCORES: tuple[str, ...] = ("leep", "logme")
# Signals of the two stages: the screen and the prior first, then the full scores and the prior.
FIRST_SIGNALS: tuple[str, ...] = ("screen", "prior")
RERANK_SIGNALS: tuple[str, ...] = ("ridge", "leep", "prior")
# What a job that loads a stored MODEL2VEC, with no training tasks at hand, ranks by: the
# screen first, then ridge LOO and LEEP with equal weights.
DEFAULT_FIRST = {"screen": 1.0}
DEFAULT_RERANK = {"ridge": 1.0, "leep": 1.0}


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


def transfer_scores(context: dict[str, Any], names: Sequence[str], task: int,
                    experts: Sequence[int], n_experts: int) -> dict[str, np.ndarray]:
    """Task ``task``'s scores ``names`` for ``experts`` (NaN for the others), read from
    ``context["transfer_scores"]`` when the caller computed them already, else from the
    experts' outputs (``features`` for LogME and ridge LOO, ``source_probs`` for LEEP) and
    ``labels``."""
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


class ShortlistRecommender(Selector):
    """A cheap first stage's shortlist, re-ranked by the shortlisted experts' transfer scores,
    both fusions learned on the training tasks (module docstring).

    Reads, per training task, every expert's outputs (``features`` and/or ``source_probs``, and
    ``labels``) or their ``transfer_scores``, and the ``screen_scores``; per ranked task, its
    ``screen_scores`` and ``screen_passes`` and the outputs of its shortlist only.

    ``k``: experts on the shortlist; ``mass``: stop earlier once the shortlist holds this share
    of MODEL2VEC's p(expert | task) (None: always k); ``include_generic``: the generic experts
    join every shortlist; ``model2vec_weight``: the weight of MODEL2VEC's z-scored log p in the
    first stage; ``temperature``: of the fusions' targets (:class:`ListwiseFusion`); ``fits``: a
    :class:`FitMemo` shared with other rows; the other keywords go to :class:`Model2Vec`, which
    fits with the recommender's ``error_floor``.
    """

    name = "shortlist"
    paper_name = None

    def __init__(self, k: int = 3, *, mass: float | None = None, include_generic: bool = False,
                 model2vec_weight: float = 0.5, temperature: float = 0.1,
                 error_floor: float = 1e-3, fits: FitMemo | None = None,
                 **model_params: Any) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self.mass = mass
        self.include_generic = include_generic
        self.model2vec_weight = model2vec_weight
        self.temperature = temperature
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
    def from_model(cls, model: Model2Vec, k: int = 3, **params: Any) -> ShortlistRecommender:
        """A recommender around a fitted MODEL2VEC (the one a job loads), for ranking new tasks
        without refitting anything: the fixed fusions :data:`DEFAULT_FIRST` and
        :data:`DEFAULT_RERANK`, no prior."""
        rec = cls(k, **params)
        rec.model_ = model
        rec.expert_ids_ = list(model.expert_ids_)
        rec.n_experts_ = len(rec.expert_ids_)
        rec.missing_source_ = np.asarray(model.missing_source_, dtype=bool)
        rec.generic_ = np.flatnonzero(rec.missing_source_)
        rec.first_fusion_ = ListwiseFusion.fixed(DEFAULT_FIRST)
        rec.fusion_ = ListwiseFusion.fixed(DEFAULT_RERANK)
        rec.prior_ = None
        return rec

    # ------------------------------------------------------------------ fitting

    def _fit(self, tasks: np.ndarray, errors: np.ndarray, expert_source_embeddings,
             **context: Any) -> None:
        self.model_ = self.fits.fit({**self.model_params, "error_floor": self.error_floor},
                                    tasks, errors, expert_source_embeddings, self.expert_ids_)
        self.generic_ = np.flatnonzero(self.missing_source_)
        names = [n for n in SCORES if n in RERANK_SIGNALS and self._has_score(context, n)]
        if not names:
            raise ValueError("ShortlistRecommender needs every training task's expert outputs "
                             "(features or source_probs, and labels) or transfer_scores")
        self.prior_ = mean_error_prior(errors, self.error_floor)
        priors = [mean_error_prior(errors, self.error_floor, exclude=t)
                  for t in range(len(errors))]  # a task's own errors never score it
        everyone = range(self.n_experts_)
        full = [{**transfer_scores(context, names, t, everyone, self.n_experts_),
                 "prior": priors[t]} for t in range(len(errors))]
        screens = context.get("screen_scores")
        first = [{"prior": p} if screens is None else {"screen": screens[t], "prior": p}
                 for t, p in enumerate(priors)]
        fusion = {"temperature": self.temperature, "error_floor": self.error_floor}
        self.first_fusion_ = ListwiseFusion(FIRST_SIGNALS, **fusion).fit(first, errors)
        self.fusion_ = ListwiseFusion(RERANK_SIGNALS, **fusion).fit(full, errors)
        log.debug("shortlist fusions: first %s, re-rank %s", self.first_fusion_, self.fusion_)

    @staticmethod
    def _has_score(context: dict[str, Any], name: str) -> bool:
        cached = context.get("transfer_scores")
        if cached is not None:
            return len(cached) > 0 and name in cached[0]
        return SCORES[name][0] in context and "labels" in context

    @staticmethod
    def _log_p(model: Model2Vec, tasks: np.ndarray) -> np.ndarray:
        logits = -model.distances(tasks) / model.tau_
        top = logits.max(1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))

    # ------------------------------------------------------------------ ranking

    def _signals(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        """A ranked task's signals, with the prior when the recommender has one."""
        return row if self.prior_ is None else {**row, "prior": self.prior_}

    def _first(self, log_p_row: np.ndarray, screen_row) -> np.ndarray:
        """The first stage's value of every expert (higher = better; −inf where the screen
        could not score an expert): the learned fusion of the screen and the prior, plus
        MODEL2VEC's z-scored log p times ``model2vec_weight``."""
        row = {} if screen_row is None else {"screen": np.asarray(screen_row, np.float64)}
        value = (self.first_fusion_.decision(self._signals(row), len(log_p_row))
                 + self.model2vec_weight * zscore(log_p_row) + 1e-9 * log_p_row)
        return np.where(np.isfinite(value), value, -np.inf)

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

    def fused(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """The re-ranking's value of every expert given its transfer scores (NaN where an
        expert has none)."""
        return self.fusion_.decision(self._signals(dict(scores)), self.n_experts_)

    def _rerank(self, first_row: np.ndarray, head: np.ndarray, scores: dict[str, np.ndarray]
                ) -> np.ndarray:
        """The shortlist by its fused value (ties and unscored experts: the first stage's
        order), then everyone else in the first stage's order."""
        fused = self.fused(scores)[head]
        ranked_head = head[rank_by_score(np.where(np.isfinite(fused), fused, -np.inf)
                                         + 1e-9 * first_row[head], higher_is_better=True)]
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
        rankings = [self._rerank(f, self._head(f, row), s)
                    for f, row, s in zip(first, log_p, scores, strict=True)]
        return np.stack(rankings) if rankings else np.zeros((0, self.n_experts_), np.int64)

    def rank(self, task_embeddings, **context: Any) -> np.ndarray:
        screens = context.get("screen_scores")
        heads = self.shortlist(task_embeddings, screens)
        names = [n for n in SCORES if n in self.fusion_.coef_]
        scores = [transfer_scores(context, names, j, head, self.n_experts_)
                  for j, head in enumerate(heads)]
        screened = context.get("screen_passes") if screens is not None else None
        self.ledger.add([h.size + (0.0 if screened is None else float(screened[j]))
                         for j, h in enumerate(heads)])
        return self.rerank(task_embeddings, scores, screens)


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


def screen_value(rows: Mapping[str, Any]) -> np.ndarray:
    """The screen's value of each expert: the mean of its z-scored scores ``rows`` (name ->
    one value per expert, None for a score the task lacks) across the task's experts, over
    whichever it has (NaN with none). The scores of :data:`SCREEN_SCORES` come from the same
    forward pass, and each is the better score at some image size."""
    parts = [zscore(np.asarray(r, np.float64)) for r in rows.values() if r is not None]
    if not parts:
        raise ValueError("the screen needs at least one score row")
    stacked = np.stack(parts)
    finite = np.isfinite(stacked)
    total = np.where(finite, stacked, 0.0).sum(axis=0)
    count = finite.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _screen_scores(outputs: Sequence, labels: np.ndarray, idx: np.ndarray, score) -> np.ndarray:
    return np.asarray([np.nan if o is None else score(np.asarray(o)[idx], labels[idx])
                       for o in outputs])


def screen_context(context: dict[str, Any], per_class: int = SCREEN_PER_CLASS, seed: int = 0
                   ) -> dict[str, list]:
    """The screen of every task: each expert's :data:`SCREEN_SCORES` on at most ``per_class``
    of the task's training images per class, as one :func:`screen_value` (``screen_scores``),
    and its cost in expert forward passes (``screen_passes``: experts × images screened /
    images). Computed from the experts' outputs on the whole split, which on the screened
    images are exactly what a pass over those images alone gives; empty without the outputs."""
    if "labels" not in context or not any(SCORES[n][0] in context for n in SCREEN_SCORES):
        return {}
    n_tasks = len(context["labels"])
    outputs = {key: context.get(key, [None] * n_tasks)
               for key in {SCORES[name][0] for name in SCREEN_SCORES}}
    scores, passes = [], []
    for t, labels in enumerate(context["labels"]):
        y = np.asarray(labels)
        idx = screen_subset(y, per_class, seed)
        rows = {}
        for name in SCREEN_SCORES:
            key, score = SCORES[name]
            outs = outputs[key][t]
            rows[name] = None if outs is None else _screen_scores(outs, y, idx, score)
        scores.append(screen_value(rows))
        n_experts = max(len(o[t]) for o in outputs.values() if o[t] is not None)
        passes.append(n_experts * idx.size / max(y.size, 1))
    return {"screen_scores": scores, "screen_passes": passes}


def default_recommenders(context: dict | None, *, ks: Sequence[int] = DEFAULT_KS, seed: int = 0,
                         model2vec_epochs: int = 300, error_floor: float = 1e-3,
                         model_params: dict[str, Any] | None = None,
                         fits: FitMemo | None = None) -> dict[str, ShortlistRecommender]:
    """The default recommender at each shortlist size in ``ks``, as Table 1 names its rows;
    none when ``context`` lacks the experts' outputs the re-ranking reads. ``model_params``
    and ``fits``: those of Table 1's Model2Vec row, so that all of them fit one MODEL2VEC per
    fold (default: ``model2vec_epochs`` and ``seed``, a memo of their own)."""
    if not context or not any(SCORES[n][0] in context for n in SCORES) or "labels" not in context:
        return {}
    fits = FitMemo() if fits is None else fits
    params = dict(model_params or {"max_epochs": model2vec_epochs, "random_state": seed})
    floor = params.pop("error_floor", error_floor)
    return {f"Shortlist k={k}": ShortlistRecommender(k, error_floor=floor, fits=fits, **params)
            for k in ks}


def with_screen(context: dict[str, Any]) -> dict[str, Any]:
    """``context`` plus what the default recommender reads: every expert's transfer scores
    (computed once, not once per fold; a ranked task reads only its shortlist's) and the
    screen."""
    return {**context, "transfer_scores": all_transfer_scores(context),
            **screen_context(context)}
