"""The inputs of every recommender, read from a storage root in one aligned piece.

MODEL2VEC, the selectors and the evaluation all want the same arrays: task embeddings (T×d),
the task × expert error matrix (T×E, NaN where a cell is missing), each expert's source-task
embedding (E×d, NaN for an expert without one, such as the generic ImageNet expert) and the
tasks' families. Only tasks that have both an embedding at their current content hash and at
least one matrix cell take part. Each expert's source task id marks the *novel* tasks, those no
expert was trained on, which is what a new task is.

An expert without a source task (the generic ImageNet expert) still needs a place in task
space for the selectors that rank by distance to source tasks; :func:`place_generic_experts`
learns it from the training tasks.

The same arrays exist per training-set size (``max_per_class``: the matrix rows trained on at
most that many images per class). Task embeddings computed on such a subset are stored beside
the full-data ones, keyed by the same size (:mod:`t2v_core.embedding.store`), so one probe and
method name them all and each size reads its own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from t2v_core.embedding.distance import complexity, d_sym
from t2v_core.embedding.store import describe_size, read_embeddings
from t2v_core.matrix.rows import pivot, read_matrix
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR, relative_increase
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_experts, read_tasks

log = logging.getLogger(__name__)

_PARTITION = re.compile(r"^(?P<key>[a-z_]+)=(?P<value>.+)$")
EMBEDDING_SOURCES = ("subsample", "full")


@dataclass(frozen=True)
class MetaDataset:
    """Aligned arrays for fitting and evaluating expert selectors."""

    probe_id: str
    method: str
    task_ids: tuple[str, ...]
    families: tuple[str, ...]
    embeddings: np.ndarray  # T × d
    errors: np.ndarray  # T × E, NaN = no result
    expert_ids: tuple[str, ...]
    expert_sources: np.ndarray  # E × d, NaN rows for experts without a source task
    filter_names: tuple[str, ...] | None = None
    max_per_class: int | None = None  # training images per class of the matrix; None: all
    task_embeddings: str = "full"  # "subsample": tasks embedded on the matrix's image subset
    # T × E validation errors of the same cells (the split each cell's configuration was
    # picked on), NaN where a row does not record one: what a brute-force search would see.
    val_errors: np.ndarray | None = None
    # T × E test-set sizes behind the errors, NaN where a row does not record one (older
    # rows): how precise each error is, e.g. for the oracle's noise floor.
    test_sizes: np.ndarray | None = None
    # per expert, the task it was trained on (None: a generic expert); None when unknown
    expert_source_task_ids: tuple[str | None, ...] | None = None

    def novel_task_indices(self) -> list[int]:
        """Indices of the tasks that are no expert's source: what a new task looks like, since
        an expert's own source task is an exact d_sym = 0 match that no new task has. Every
        task when the sources are unknown."""
        sources = set(self.expert_source_task_ids or ())
        return [t for t, task_id in enumerate(self.task_ids) if task_id not in sources]

    def task_test_sizes(self) -> np.ndarray | None:
        """One test-set size per task (its cells share one test split); None unless every
        task records one."""
        if self.test_sizes is None:
            return None
        sizes = np.asarray(self.test_sizes, dtype=np.float64)
        recorded = np.isfinite(sizes).any(axis=1)
        if sizes.size == 0 or not recorded.all():
            return None
        return np.nanmax(sizes, axis=1).astype(np.int64)

    def subset(self, task_ids: Sequence[str]) -> MetaDataset:
        """These arrays on ``task_ids`` alone, in that order, every per-task field alike
        (validation errors and test sizes too), so that a context built from the result
        lines up with its rows."""
        position = {t: i for i, t in enumerate(self.task_ids)}
        if unknown := [t for t in task_ids if t not in position]:
            raise ValueError(f"not in this meta-dataset: {', '.join(map(str, unknown[:10]))}")
        if len(set(task_ids)) != len(task_ids):
            raise ValueError("task_ids name a task more than once")
        index = [position[t] for t in task_ids]

        def rows(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        return replace(
            self, task_ids=tuple(task_ids), families=tuple(self.families[i] for i in index),
            embeddings=rows(self.embeddings), errors=rows(self.errors),
            val_errors=rows(self.val_errors), test_sizes=rows(self.test_sizes))

    def align(self, other: MetaDataset) -> MetaDataset:
        """These arrays on the tasks ``other`` has too, in this one's order: two meta-datasets
        (e.g. two training-set sizes) compared on the same tasks. Both must rank the same
        experts, or their matrix columns would not correspond."""
        if other.expert_ids != self.expert_ids:
            raise ValueError("the meta-datasets have different experts: "
                             f"{len(self.expert_ids)} here, {len(other.expert_ids)} there")
        theirs = set(other.task_ids)
        return self.subset([t for t in self.task_ids if t in theirs])

    @property
    def generic_experts(self) -> tuple[str, ...]:
        missing = np.isnan(self.expert_sources).all(axis=1)
        return tuple(e for e, m in zip(self.expert_ids, missing, strict=True) if m)


def _partitions(root: StorageRoot, rel: str, key: str) -> list[str]:
    values = []
    for name in root.list(rel):
        m = _PARTITION.match(name.rstrip("/").rsplit("/", 1)[-1])
        if m and m["key"] == key:
            values.append(m["value"])
    return sorted(values)


def resolve_embedding_set(
    root: StorageRoot, probe_id: str | None = None, method: str | None = None
) -> tuple[str, str]:
    """Pick the probe and method of the stored embeddings, or explain what to pass."""
    probes = _partitions(root, "embeddings", "probe")
    if probe_id is None:
        if len(probes) != 1:
            raise ValueError(
                f"{len(probes)} probes have embeddings under {root!r} ({', '.join(probes) or 'none'}); "
                "pass --probe-id"
            )
        probe_id = probes[0]
    methods = _partitions(root, f"embeddings/probe={probe_id}", "method")
    if method is None:
        if len(methods) != 1:
            raise ValueError(
                f"probe {probe_id} has embeddings for {methods or 'no'} methods; pass --method"
            )
        method = methods[0]
    if method not in methods:
        raise ValueError(f"no {method} embeddings for probe {probe_id} (found {methods})")
    return probe_id, method


def load_meta_dataset(
    root: StorageRoot | str,
    probe_id: str | None = None,
    method: str | None = None,
    *,
    mode: str = "probe",
    max_per_class: int | None = None,
    task_embeddings: str = "full",
) -> MetaDataset:
    """Read zoo, embeddings and matrix from ``root`` and align them.

    ``max_per_class`` picks the matrix of that training-set size (None: full data). With
    ``task_embeddings="subsample"`` the tasks' embeddings are those of that size, computed on
    the images its matrix cells were trained on; the experts' source embeddings always come
    from full data, as each expert was trained on all of its source.
    """
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    if task_embeddings not in EMBEDDING_SOURCES:
        raise ValueError(f"task_embeddings must be one of {EMBEDDING_SOURCES}, got {task_embeddings!r}")
    if max_per_class is None:
        task_embeddings = "full"
    probe_id, method = resolve_embedding_set(root, probe_id, method)
    tasks = read_tasks(root)
    experts = sorted(read_experts(root), key=lambda e: e.expert_id)
    if not tasks or not experts:
        raise ValueError(f"the zoo under {root!r} has {len(tasks)} tasks and {len(experts)} experts")
    full = read_embeddings(root, probe_id, method, tasks)
    emb = full
    if task_embeddings == "subsample":
        emb = read_embeddings(root, probe_id, method, tasks, max_per_class=max_per_class)
    table = read_matrix(root, mode=mode, tasks=tasks, experts=experts, max_per_class=max_per_class)
    expert_ids = [e.expert_id for e in experts]
    errors, row_ids, _ = pivot(table, emb.task_ids, expert_ids, max_per_class=max_per_class)
    recorded = _with_config_numbers(table, ("val_error", "n_test"))
    val_errors, _, _ = pivot(recorded, emb.task_ids, expert_ids, "val_error",
                             max_per_class=max_per_class)
    test_sizes, _, _ = pivot(recorded, emb.task_ids, expert_ids, "n_test",
                             max_per_class=max_per_class)
    keep = np.isfinite(errors).any(axis=1)
    if not keep.any():
        raise ValueError(f"no task under {root!r} has both a {probe_id}/{method} embedding "
                         f"({task_embeddings} data) and a {mode} matrix cell "
                         f"({describe_size(max_per_class)})")
    if (~keep).any():
        log.info("%d embedded task(s) have no matrix cell yet and are left out", int((~keep).sum()))
    by_id = {t.task_id: t for t in tasks}
    vectors = emb.vectors
    sources = np.full((len(experts), vectors.shape[1]), np.nan, dtype=np.float64)
    for j, e in enumerate(experts):
        if e.source_task_id and e.source_task_id in full.task_ids:
            sources[j] = full.row(e.source_task_id)
        elif e.source_task_id:
            log.warning("expert %s: its source task %s has no embedding; treated as generic",
                        e.expert_id, e.source_task_id)
    ids = [t for t, k in zip(row_ids, keep, strict=True) if k]
    return MetaDataset(
        probe_id=probe_id,
        method=method,
        task_ids=tuple(ids),
        families=tuple(by_id[t].family for t in ids),
        embeddings=vectors[keep].astype(np.float64),
        errors=errors[keep],
        expert_ids=tuple(expert_ids),
        expert_sources=sources,
        filter_names=emb.filter_names,
        max_per_class=max_per_class,
        task_embeddings=task_embeddings,
        val_errors=val_errors[keep],
        test_sizes=test_sizes[keep],
        expert_source_task_ids=tuple(e.source_task_id or None for e in experts),
    )


def _with_config_numbers(table: pa.Table, keys: tuple[str, ...]) -> pa.Table:
    """The matrix rows plus one float column per key, read from each row's recorded config
    (null where a row's config lacks it or is unreadable)."""
    values: dict[str, list] = {key: [] for key in keys}
    for config in table.column("config").to_pylist():
        try:
            parsed = json.loads(config) if config else {}
        except ValueError:
            parsed = {}
        for key in keys:
            value = parsed.get(key) if isinstance(parsed, dict) else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            values[key].append(float(value) if ok else None)
    for key in keys:
        table = table.append_column(key, pa.array(values[key], pa.float64()))
    return table


def _top1_losses(scores: np.ndarray, errors: np.ndarray, error_floor: float) -> np.ndarray:
    """Per candidate (C×E×T scores, lower = better): the relative increase over the best expert
    of each task's top pick among its observed experts (C×T, NaN for a task with none)."""
    observed = np.isfinite(errors)  # T×E
    picks = np.argmin(np.where(observed.T[None], scores, np.inf), axis=1)  # C×T, first on ties
    filled = np.where(observed, errors, np.inf)
    best = np.where(observed.any(1), filled.min(axis=1), np.nan)
    picked = filled[np.arange(errors.shape[0])[None, :], picks]
    out = relative_increase(picked, best[None, :], error_floor)
    return np.where(observed.any(1)[None, :] & np.isfinite(out), out, np.nan)


def place_generic_experts(
    tasks: np.ndarray, errors: np.ndarray, sources: np.ndarray, generic: np.ndarray, *,
    alpha: float = 0.0, t0: np.ndarray | None = None,
    error_floor: float = DEFAULT_ERROR_FLOOR,
) -> tuple[np.ndarray, float]:
    """Source rows for the experts without a source task, learned from the training tasks.

    Candidate places: the mean training task, the mean of the training tasks where the
    generic expert is best, and every training task. Each is scored by what it makes the
    selector's own ranking — d_sym(source, task) − α · complexity(source, t0), best first —
    cost on the training tasks: the mean relative increase of the top pick over the best
    expert (a task's own position is left out of that task's score). The best candidate wins;
    ties keep the earlier one, so a zoo with no evidence keeps the mean. Several generic
    experts are placed one after the other. Returns (sources with those rows filled, the
    chosen place's training loss).
    """
    tasks = np.asarray(tasks, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    out = np.asarray(sources, dtype=np.float64).copy()
    generic = np.asarray(generic, dtype=bool)
    out[generic] = tasks.mean(axis=0)
    if not generic.any():
        return out, np.nan
    bonus = (lambda x: alpha * np.atleast_1d(complexity(x, t0))) if alpha and t0 is not None \
        else (lambda x: np.zeros(len(x)))
    base = np.asarray(d_sym(out, tasks)).reshape(len(out), -1) - bonus(out)[:, None]  # E×T
    loss = np.nan
    for g in np.flatnonzero(generic):
        wins = np.nanargmin(np.where(np.isfinite(err), err, np.inf), axis=1) == g
        candidates = [tasks.mean(axis=0), *([tasks[wins].mean(axis=0)] if wins.any() else []),
                      *tasks]
        cand = np.stack(candidates)
        rows = np.asarray(d_sym(cand, tasks)).reshape(len(cand), -1) - bonus(cand)[:, None]
        scores = np.repeat(base[None], len(cand), axis=0)
        scores[:, g, :] = rows
        losses = _top1_losses(scores, err, error_floor)
        own = len(cand) - len(tasks)
        losses[own + np.arange(len(tasks)), np.arange(len(tasks))] = np.nan
        mean = np.array([np.nanmean(r) if np.isfinite(r).any() else np.inf for r in losses])
        choice = int(np.argmin(mean))  # first on ties
        out[g], base[g], loss = cand[choice], rows[choice], float(mean[choice])
    return out, loss
