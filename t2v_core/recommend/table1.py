"""The paper's Table 1 on a meta-dataset: which selectors take part, what they read, and the
report.

The rows are the paper's columns (Chance, ImageNet, Task2Vec, Asym Task2Vec, Model2Vec), the
static mean-error prior every recommender must beat, and the oracle. Rows that need per-task
inputs beyond embeddings and errors join when those inputs exist (:data:`CONTEXT_COLUMNS`):
LogME, LEEP, ridge LOO and NCE from the expert features the matrix job cached and the
experts' source heads (:func:`transfer_context`), and the brute-force search from the matrix's
validation errors. With several families a "Family best" reference row, told each task's family, shows
what knowing the family alone is worth. The default recommender
(:mod:`t2v_core.recommend.shortlist`) joins at shortlists of 1, 3 and 5 experts when the
experts' outputs are there, and every row's cost in expert forward passes per task is reported
next to its quality (:mod:`t2v_core.recommend.cost`). :func:`evaluate_table1` holds tasks out
(:mod:`t2v_core.recommend.protocol`) and writes the Markdown and JSON of the whole report,
with the embedding diagnostics and the oracle's test-noise floor.

The headline view scores the *novel* tasks, those no expert was trained on: on an expert's own
source task the embedding selectors find an exact d_sym = 0 match that no new task has. All
tasks follow as a second view. Selectors are fitted on every training task either way, and
every fit takes the report's ``error_floor``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from t2v_core.embedding.fisher import PRIOR_PRECISION
from t2v_core.embedding.probes import WeightsError
from t2v_core.matrix.experts import load_head
from t2v_core.matrix.features import FeatureCache, FeatureKey
from t2v_core.recommend.cost import CostPoint, cost_markdown, cost_payload, cost_points
from t2v_core.recommend.diagnostics import family_recovery, norm_vs_difficulty
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR
from t2v_core.recommend.model2vec import FitMemo
from t2v_core.recommend.noise_floor import NoiseFloor, oracle_noise_floor
from t2v_core.recommend.protocol import (
    ALL_TASKS,
    MIXED,
    EvaluationResult,
    evaluate_selectors,
)
from t2v_core.recommend.report import folds_label, to_json, views_markdown
from t2v_core.recommend.selectors import (
    AsymTask2VecSelector,
    BruteForceSelector,
    ChanceSelector,
    FamilyBestSelector,
    GenericSelector,
    LEEPSelector,
    LogMESelector,
    MeanErrorPrior,
    Model2VecSelector,
    NCESelector,
    OracleSelector,
    RidgeLOOSelector,
    Selector,
    Task2VecSelector,
    hard_predictions,
)
from t2v_core.recommend.shortlist import default_recommenders, with_screen
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_experts, read_tasks

__all__ = [
    "CONTEXT_COLUMNS",
    "NOVEL",
    "Table1Report",
    "before_oracle",
    "evaluate_table1",
    "noise_floor",
    "noise_floor_sentence",
    "standard_selectors",
    "table1_rows",
    "table1_views",
    "transfer_context",
    "with_context_columns",
    "with_validation_errors",
]

log = logging.getLogger(__name__)

# Columns that need per-task inputs beyond embeddings and errors, each with the context key
# it reads (see t2v_core.recommend.selectors): the per-expert transferability scores, and the
# brute-force search on each cell's validation split.
CONTEXT_COLUMNS: dict[str, tuple[str, type[Selector]]] = {
    "LogME": ("features", LogMESelector),
    "LEEP": ("source_probs", LEEPSelector),
    "Ridge LOO": ("features", RidgeLOOSelector),
    "NCE": ("source_labels", NCESelector),
    "Brute force (val)": ("val_errors", BruteForceSelector),
}


NOVEL = "novel"  # the view of the tasks that are no expert's source


def standard_selectors(data: MetaDataset, *, seed: int = 0, model2vec_epochs: int = 300,
                       error_floor: float = DEFAULT_ERROR_FLOOR) -> dict[str, Selector]:
    """The paper's columns, the static mean-error prior every recommender must beat, the oracle.

    Every selector that fits on relative increases takes ``error_floor``, the report's; for
    variational embeddings t0 is the Fisher prior's precision.
    """
    level = PRIOR_PRECISION if data.method == "variational" else None
    selectors: dict[str, Selector] = {"Chance": ChanceSelector(random_state=seed)}
    if data.generic_experts:
        selectors["ImageNet"] = GenericSelector(generic=data.generic_experts[0])
    selectors.update({
        "Mean-error prior": MeanErrorPrior(error_floor=error_floor),
        "Task2Vec": Task2VecSelector(error_floor=error_floor),
        "Asym Task2Vec": AsymTask2VecSelector(error_floor=error_floor, level=level),
        "Model2Vec": Model2VecSelector(max_epochs=model2vec_epochs, random_state=seed,
                                       error_floor=error_floor, t0_level=level,
                                       fits=FitMemo()),
        "Oracle": OracleSelector(),
    })
    return selectors


def table1_views(data: MetaDataset) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The tasks each view scores, the novel ones first, and each view's heading; one view of
    all tasks when every task is novel (no expert's source is among them)."""
    every = list(range(len(data.task_ids)))
    novel = data.novel_task_indices()
    if len(novel) == len(every):
        return {ALL_TASKS: every}, {ALL_TASKS: f"All {len(every)} tasks (no expert's source)"}
    views = {NOVEL: novel, ALL_TASKS: every}
    titles = {NOVEL: f"Novel tasks: the {len(novel)} tasks that are no expert's source "
                     "(headline)",
              ALL_TASKS: f"All {len(every)} tasks, experts' source tasks included"}
    return views, titles


def before_oracle(selectors: dict[str, Selector], name: str, selector: Selector
                  ) -> dict[str, Selector]:
    """``selectors`` with ``name`` added as the row just above the oracle's."""
    rest = {k: v for k, v in selectors.items() if k != "Oracle"}
    oracle = {"Oracle": selectors["Oracle"]} if "Oracle" in selectors else {}
    return {**rest, name: selector, **oracle}


def with_context_columns(selectors: dict[str, Selector], context: dict | None
                         ) -> dict[str, Selector]:
    """The columns of :data:`CONTEXT_COLUMNS` whose inputs ``context`` carries, before Oracle."""
    for name, (key, cls) in CONTEXT_COLUMNS.items():
        if context and key in context:
            selectors = before_oracle(selectors, name, cls())
    return selectors


def with_validation_errors(data: MetaDataset, context: dict | None) -> dict | None:
    """``context`` plus the matrix's validation errors, when every task has some."""
    val = data.val_errors
    if val is None or not np.isfinite(val).any(axis=1).all():
        return context
    return {**(context or {}), "val_errors": list(val)}


# --------------------------------------------------------------------------- transfer context


def _cached_features(root: StorageRoot, data: MetaDataset, experts: dict, image_size: int,
                     max_per_class: int | None, seed: int
                     ) -> tuple[list[list[np.ndarray]], list[np.ndarray]] | None:
    """Per task, every expert's cached training-split features, and the task's labels; None
    when some are missing (the matrix job computes them; the evaluation never runs an expert)."""
    cache = FeatureCache(root)
    tasks = {t.task_id: t for t in read_tasks(root)}
    features, labels = [], []
    for task_id in data.task_ids:
        per_expert = []
        for expert_id in data.expert_ids:
            key = FeatureKey.for_cell(experts[expert_id], tasks[task_id], "train", image_size,
                                      max_per_class, seed)
            cached = cache.load(key)
            if cached is None:
                log.warning("no cached features for %s on %s: the per-expert scores left out",
                            expert_id, task_id)
                return None
            per_expert.append(cached.features.astype(np.float64))
        features.append(per_expert)
        labels.append(cached.labels)
    return features, labels


def _source_heads(data: MetaDataset, experts: dict) -> list | None:
    """Every expert's source head, in ``data.expert_ids`` order; None if one has none."""
    heads = []
    for expert_id in data.expert_ids:
        try:
            head = load_head(experts[expert_id].weights_uri)
        except WeightsError as exc:
            log.warning("unreadable source head of %s (%s): LEEP and NCE left out", expert_id, exc)
            return None
        if head is None:
            log.warning("no source head for %s: LEEP and NCE left out", expert_id)
            return None
        heads.append(head)
    return heads


def _source_probs(heads: list, features: list[list[np.ndarray]]) -> list[list[np.ndarray]] | None:
    """Per task, per expert: the source head's softmax over its classes on the cached
    features, which are the backbone output the head was trained on."""
    try:
        return [[h.probabilities(f) for h, f in zip(heads, per_expert, strict=True)]
                for per_expert in features]
    except ValueError as exc:  # a head that does not fit its expert's features
        log.warning("source heads do not match the cached features (%s): LEEP and NCE left out",
                    exc)
        return None


def transfer_context(root: StorageRoot, data: MetaDataset, image_size: int,
                     max_per_class: int | None = None, seed: int = 0) -> dict | None:
    """What the per-expert transferability columns read, per task (item j = task j):
    ``features`` and ``labels`` (LogME, ridge LOO); when every expert has a source head, also its
    ``source_probs`` (LEEP) and hard ``source_labels`` (NCE). None without the features:
    each of these baselines needs a forward pass of every expert over every task."""
    experts = {e.expert_id: e for e in read_experts(root)}
    cached = _cached_features(root, data, experts, image_size, max_per_class, seed)
    if cached is None:
        return None
    features, labels = cached
    context: dict = {"features": features, "labels": labels}
    heads = _source_heads(data, experts)
    probs = None if heads is None else _source_probs(heads, features)
    if probs is not None:
        context["source_probs"] = probs
        context["source_labels"] = [[hard_predictions(p) for p in task] for task in probs]
    return context


# --------------------------------------------------------------------------- noise floor


def noise_floor(data: MetaDataset, error_floor: float, tasks: list[int] | None = None
                ) -> NoiseFloor | None:
    """The oracle's test-noise floor over ``tasks`` (default all), when the matrix records
    every task's test-set size (rows written before sizes were recorded: None)."""
    sizes = data.task_test_sizes()
    if sizes is None:
        log.info("the matrix does not record test-set sizes: no noise floor in the report")
        return None
    idx = list(range(len(data.task_ids))) if tasks is None else list(tasks)
    if not idx:
        return None
    return oracle_noise_floor(data.errors[idx], sizes[idx], error_floor=error_floor)


def noise_floor_sentence(floor: NoiseFloor) -> str:
    """The report's sentence on the noise floor: what it is and why no selector beats it."""
    low, high = floor.ci95_pct
    return (f"Test-noise floor: the truly best expert itself, re-measured on test sets of the "
            f"same size, scores +{floor.mean_pct:.1f}% over the re-measured oracle "
            f"(95% of re-measurements: +{low:.1f}% … +{high:.1f}%). The oracle is the luckiest "
            "of the experts' noisy test errors, so no selector can be expected below this; "
            "experts are re-measured independently, which makes it an upper bound."
            + _tau_ceiling_sentence(floor))


def _tau_ceiling_sentence(floor: NoiseFloor) -> str:
    if math.isnan(floor.weighted_tau):
        return ""
    low, high = floor.weighted_tau_ci95
    return (f" The same re-measurements put the ranking's ceiling at weighted τ "
            f"{floor.weighted_tau:.2f} ({low:.2f} … {high:.2f}): the ranking by the true errors "
            "scores that against the re-measured ones, not 1.")


# --------------------------------------------------------------------------- the evaluation


@dataclass(frozen=True)
class Table1Report:
    """One Table-1 evaluation: the result, its Markdown report, and its JSON (``payload``,
    what ``table1.json`` holds)."""

    result: EvaluationResult
    markdown: str
    payload: dict
    costs: list[CostPoint] = field(default_factory=list)  # every row's cost and quality


def table1_rows(data: MetaDataset, context: dict | None, *, seed: int, model2vec_epochs: int,
                error_floor: float) -> tuple[dict[str, Selector], dict | None]:
    """The selectors of the table, each fitting with ``error_floor``, and the context they
    read."""
    context = with_validation_errors(data, context)
    selectors = with_context_columns(
        standard_selectors(data, seed=seed, model2vec_epochs=model2vec_epochs,
                           error_floor=error_floor), context)
    model2vec = selectors["Model2Vec"]
    recommenders = default_recommenders(context, error_floor=error_floor,
                                        model_params=model2vec.model_params, fits=model2vec.fits)
    if recommenders:
        context = with_screen(context)
    for name, recommender in recommenders.items():
        selectors = before_oracle(selectors, name, recommender)
    if len(set(data.families)) > 1:
        selectors = before_oracle(selectors, "Family best", FamilyBestSelector(error_floor))
        context = {**(context or {}), "families": list(data.families)}
    return selectors, context


def evaluate_table1(data: MetaDataset, folds: str | int = "loo", *, seed: int = 0,
                    model2vec_epochs: int = 300, error_floor: float = DEFAULT_ERROR_FLOOR,
                    context: dict | None = None, repeats: int = 1) -> Table1Report:
    """The whole evaluation of one meta-dataset, as plain data plus the Markdown table.

    ``context`` (see :func:`transfer_context`) adds the LogME, LEEP, ridge LOO and NCE columns it has
    inputs for; the matrix's validation errors add the brute-force column. ``folds``,
    ``repeats`` and ``seed`` are those of :func:`~t2v_core.recommend.protocol.evaluate_selectors`.
    """
    selectors, context = table1_rows(data, context, seed=seed,
                                     model2vec_epochs=model2vec_epochs, error_floor=error_floor)
    views, titles = table1_views(data)
    result = evaluate_selectors(
        selectors, data.embeddings, data.errors, data.expert_sources, list(data.expert_ids),
        list(data.families), folds=folds, random_state=seed, error_floor=error_floor,
        context=context, repeats=repeats, views=views,
    )
    recovery = family_recovery(data.embeddings, list(data.families))
    difficulty = norm_vs_difficulty(data.embeddings, data.errors)
    floors = {view: noise_floor(data, error_floor, idx) for view, idx in views.items()}
    notes = {view: noise_floor_sentence(f) for view, f in floors.items() if f is not None}
    costs = cost_points(result, selectors)  # the headline view's Mixed
    markdown = "\n\n".join([
        f"## Expert selection ({len(data.task_ids)} tasks × {len(data.expert_ids)} experts, "
        f"probe {data.probe_id}, {data.method} Fisher, {folds_label(folds, repeats)}, "
        f"oracle errors floored at {error_floor:g})",
        views_markdown(result, titles, notes).rstrip(),
        cost_markdown(costs, len(data.expert_ids),
                      f"{MIXED}, {next(iter(views)).lower()} tasks"),
        f"Family recovery from embeddings alone (1-NN, d_sym, all tasks): "
        f"{recovery.accuracy:.1%} (chance {recovery.chance_accuracy:.1%}).",
        f"Embedding norm vs the task's best error: Spearman ρ = {difficulty.spearman:.2f}.",
    ])
    headline = next(iter(views))
    payload = {
        "table1": json.loads(to_json(result)),
        "views": {view: [data.task_ids[t] for t in idx] for view, idx in views.items()},
        "cost": cost_payload(costs),
        "family_recovery": json.loads(to_json(recovery)),
        "norm_vs_difficulty": json.loads(to_json(difficulty)),
        "oracle_noise_floor": None if floors[headline] is None else asdict(floors[headline]),
        "oracle_noise_floor_by_view": {v: None if f is None else asdict(f)
                                       for v, f in floors.items()},
        "probe_id": data.probe_id,
        "method": data.method,
        "error_floor": error_floor,
        "task_ids": list(data.task_ids),
        "expert_ids": list(data.expert_ids),
    }
    return Table1Report(result, markdown, payload, costs)
