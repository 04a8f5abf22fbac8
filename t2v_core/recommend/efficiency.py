"""Expert selection by training-set size (the data-efficiency table): the Table-1 selectors
evaluated at several caps on training images per class, on the same tasks at every size.

A size is ``max_per_class``: at most that many training images per class, a seeded subset
(None: all of them). At each size the matrix rows, and with ``task_embeddings="subsample"`` the
task embeddings, are those computed on that size's images. The per-expert columns (LogME,
LEEP, NCE, brute force) read that size's inputs too, and a column some size cannot score is
left out at every size, so that every size has the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from t2v_core.recommend import protocol
from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.recommend.report import EfficiencySetting, data_efficiency_report, size_label
from t2v_core.recommend.table1 import (
    CONTEXT_COLUMNS,
    standard_selectors,
    transfer_context,
    with_context_columns,
    with_validation_errors,
)
from t2v_core.storage import StorageRoot

log = logging.getLogger(__name__)

#: The per-task scores of each selector that :func:`efficiency_metrics` reports.
METRICS = ("relative_increase_pct", "top1_hit_rate", "weighted_tau")


def load_sizes(root: StorageRoot, probe_id: str, method: str, sizes: Sequence[int | None], *,
               mode: str = "probe", task_embeddings: str = "subsample"
               ) -> tuple[dict[int | None, MetaDataset], list[str]]:
    """One meta-dataset per size, on the tasks every size has, in one order; and the tasks
    some size lacks. Raises ValueError (naming the size) when a size has nothing to read, or
    fewer than two tasks are common to all sizes (held-out evaluation needs two)."""
    data = {}
    for size in sizes:
        try:
            data[size] = load_meta_dataset(root, probe_id, method, mode=mode,
                                           max_per_class=size, task_embeddings=task_embeddings)
        except ValueError as exc:
            raise ValueError(f"{size_label(size)}: {exc}") from exc
    common = next(iter(data.values()))
    for other in data.values():
        common = common.align(other)
    dropped = sorted(set().union(*(d.task_ids for d in data.values())) - set(common.task_ids))
    if len(common.task_ids) < 2:
        raise ValueError(f"only {len(common.task_ids)} task(s) have an embedding and matrix rows "
                         "at every size; the evaluation holds tasks out, so it needs at least 2")
    if dropped:
        log.warning("%d task(s) lack an embedding or matrix rows at some size and are left "
                    "out: %s", len(dropped), ", ".join(dropped[:10]))
    return {size: d.subset(common.task_ids) for size, d in data.items()}, dropped


def size_context(root: StorageRoot, data: MetaDataset, image_size: int | None, seed: int = 0
                 ) -> dict:
    """What the context columns read at the size of ``data``: every expert's features of that
    size's training subset, as the matrix job cached them under ``image_size`` (LogME, LEEP,
    NCE; none without it), and the validation errors of that size's cells (brute force)."""
    context = None
    if image_size:
        context = transfer_context(root, data, image_size, max_per_class=data.max_per_class,
                                   seed=seed)
    return with_validation_errors(data, context) or {}


def shared_contexts(contexts: dict) -> dict:
    """Each size's context cut to the keys every size has: the table compares the same
    selectors at every size, so a column some size cannot score is left out everywhere."""
    keys = set.intersection(*(set(c) for c in contexts.values()))
    for name, (key, _) in CONTEXT_COLUMNS.items():
        lacking = [size_label(size) for size, c in contexts.items() if key not in c]
        if lacking and len(lacking) < len(contexts):
            log.warning("%s left out at every size: its input %r is missing at %s", name, key,
                        ", ".join(lacking))
    return {size: {k: v for k, v in c.items() if k in keys} for size, c in contexts.items()}


@dataclass(frozen=True)
class EfficiencyReport:
    """One data-efficiency evaluation: the result per size, its Markdown report and its JSON."""

    results: dict  # size -> EvaluationResult
    markdown: str
    payload: dict


def evaluate_data_efficiency(root: StorageRoot, data: dict[int | None, MetaDataset],
                             setting: EfficiencySetting, *, image_size: int | None = None,
                             model2vec_epochs: int = 300) -> EfficiencyReport:
    """:func:`t2v_core.recommend.protocol.data_efficiency` with the selectors of Table 1, each
    context column scored on its own size's inputs, and the report. ``data`` is
    :func:`load_sizes`' (the same tasks at every size)."""
    if not image_size:
        log.info("the per-expert scores left out: they need the image size of the features the "
                 "matrix job cached")
    contexts = shared_contexts({size: size_context(root, d, image_size, setting.seed)
                                for size, d in data.items()})
    first = next(iter(data.values()))
    selectors = with_context_columns(
        standard_selectors(first, seed=setting.seed, model2vec_epochs=model2vec_epochs,
                           error_floor=setting.error_floor),
        next(iter(contexts.values())))
    folds = setting.folds if setting.folds == "loo" else int(setting.folds)
    log.info("evaluating %d selectors at %d sizes on %d tasks × %d experts (folds=%s)",
             len(selectors), len(data), len(first.task_ids), len(first.expert_ids), folds)
    zoos = {size: (d.embeddings, d.errors, d.expert_sources) for size, d in data.items()}
    results = protocol.data_efficiency(
        selectors, zoos, first.expert_sources, list(first.expert_ids), list(first.families),
        contexts=contexts, folds=folds, random_state=setting.seed,
        error_floor=setting.error_floor, repeats=setting.repeats)
    columns = [n for n in selectors if n in CONTEXT_COLUMNS]
    markdown, payload = data_efficiency_report(results, data, setting, columns)
    return EfficiencyReport(results, markdown, payload)


def efficiency_metrics(results: dict) -> dict[str, float]:
    """``data_efficiency/<size>/<selector>/<metric>`` on all tasks (the Mixed meta-task), the
    size as ``5_per_class`` or ``all``."""
    return {
        f"data_efficiency/{'all' if size is None else f'{size}_per_class'}/{name}/{metric}":
            getattr(rep.by_meta_task[protocol.MIXED], metric)
        for size, res in results.items() for name, rep in res.reports.items()
        for metric in METRICS}
