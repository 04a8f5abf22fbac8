"""The TASK2VEC vectors of the tasks a recommender ranks: the stored embeddings of zoo tasks, or
the folders of new tasks embedded on the spot by the probe the recommender was trained with."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, embed_task, read_embeddings
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import scan_task
from t2v_core.zoo.manifest import read_tasks, select_specs

log = logging.getLogger(__name__)


class RecommendError(ValueError):
    """The tasks cannot be ranked: unknown, not embedded, or embedded by another probe."""


def zoo_task_vectors(root: StorageRoot, patterns: str, probe_id: str, method: str
                     ) -> tuple[list[str], np.ndarray]:
    """The zoo tasks ``patterns`` selects (ids or globs) and their embeddings at their current
    content hash; a task without one is an error that says which job makes it."""
    try:
        tasks = select_specs(read_tasks(root), patterns)
    except ValueError as exc:
        raise RecommendError(str(exc)) from exc
    task_ids = [t.task_id for t in tasks]
    emb = read_embeddings(root, probe_id, method, tasks, with_filter_names=False)
    missing = [t for t in task_ids if t not in emb.task_ids]
    if missing:
        raise RecommendError(f"no current {probe_id}/{method} embedding for "
                             f"{', '.join(missing)}: run jobs.embed_tasks first")
    return task_ids, np.stack([emb.row(t) for t in task_ids])


def new_task_vectors(uris: Sequence[str], arch: str, weights: str | None, probe_id: str,
                     method: str, *, image_size: int | None = None,
                     max_per_class: int | None = None) -> tuple[list[str], np.ndarray]:
    """The task folders at ``uris`` embedded by the probe ``arch``/``weights``, which must be
    the recommender's ``probe_id``: another probe's embeddings are not comparable."""
    probe = build_probe(arch, weights, input_size=image_size)
    if probe.probe_id != probe_id:
        raise RecommendError(f"the recommender was trained on embeddings of probe {probe_id}, "
                             f"but --probe/--weights give {probe.probe_id}")
    config = EmbedConfig(method=method, image_size=image_size, max_per_class=max_per_class)
    ids, vectors = [], []
    for uri in uris:
        spec, problems = scan_task(uri)
        for problem in problems:
            log.warning("%s: %s", spec.task_id, problem)
        ids.append(spec.task_id)
        vectors.append(embed_task(spec, probe, config).vector)
        log.info("embedded new task %s (%d classes)", spec.task_id, spec.n_classes)
    return ids, np.stack(vectors)
