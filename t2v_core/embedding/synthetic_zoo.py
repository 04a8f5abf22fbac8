"""A small zoo with known structure, for tests and demos: task embeddings in families, experts
each built to be best on its own family, and the task × expert error matrix that follows.

Unlike the unit-square toy (:mod:`t2v_core.embedding.toy`) nothing here runs a network: the
embeddings are sampled Fisher profiles, so a selector or the Table-1 protocol can be tested in
seconds against structure that is known by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from t2v_core.embedding import distance as _distance

__all__ = ["SyntheticZoo", "synthetic_zoo"]


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
    tasks, scale, task_cluster = _sample_families(rng, centers, tasks_per_cluster, spread)
    src, _, expert_cluster = _sample_families(rng, centers, experts_per_cluster, spread)
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

    rel = np.full((tasks.shape[0], len(sources)), generic_gap)
    same = task_cluster[:, None] == expert_cluster[None, :]
    rel[:, : src.shape[0]] = np.where(
        same, _within_family(src, tasks, same, quality, within_weight), mismatch_gap
    )
    rel -= rel.min(axis=1, keepdims=True)  # the best expert of each task sits at base_t
    errors = _measured_errors(rng, rel, scale, noise, missing_fraction)
    context: dict[str, list[Any]] = {}
    if n_samples > 0:
        context = _synthetic_context(rng, np.exp(-2.0 * rel), n_samples)
    return SyntheticZoo(
        task_embeddings=tasks,
        errors=errors,
        expert_source_embeddings=sources,
        expert_ids=ids,
        families=[f"family{k}" for k in task_cluster],
        expert_families=expert_families,
        generic_index=generic_index,
        context=context,
    )


def _sample_families(rng: np.random.Generator, centers: np.ndarray, per_family: int,
                     spread: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``per_family`` Fisher profiles around each family centre, family after family:
    (profiles, their overall scales, their family indices)."""
    parts, scales = [], []
    for center in centers:
        emb, sc = _sample(rng, center, per_family, spread)
        parts.append(emb)
        scales.append(sc)
    family = np.repeat(np.arange(len(centers)), per_family)
    return np.concatenate(parts), np.concatenate(scales), family


def _within_family(src: np.ndarray, tasks: np.ndarray, same: np.ndarray, quality: np.ndarray,
                   within_weight: float) -> np.ndarray:
    """r_te of each specialist on every task as if it were of its family: the d_sym between the
    expert's true source and the task, normalised by its median within families, minus the
    expert's quality (T×E_specialists)."""
    within = np.asarray(_distance.d_sym(src, tasks)).T
    typical = float(np.median(within[same])) or 1.0
    return within_weight * within / typical - quality[None, :]


def _sample(rng: np.random.Generator, center: np.ndarray, n: int, spread: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """n log-normal Fisher profiles around ``center``, each at its own overall scale."""
    scale = np.exp(rng.normal(0.0, 0.3, size=(n, 1)))
    return center * np.exp(rng.normal(0.0, spread, size=(n, center.size))) * scale, scale[:, 0]


def _measured_errors(rng: np.random.Generator, rel: np.ndarray, scale: np.ndarray,
                     noise: float, missing_fraction: float) -> np.ndarray:
    """base_t · (1 + r_te + noise), base_t rising with the task's scale; with
    ``missing_fraction`` some cells NaN, never a task's best one."""
    n_tasks = rel.shape[0]
    difficulty = 0.1 + 0.3 / (1.0 + np.exp(-2.0 * np.log(scale) + rng.normal(0, 0.3, n_tasks)))
    errors = difficulty[:, None] * (1.0 + rel + noise * np.abs(rng.normal(size=rel.shape)))
    errors = np.minimum(errors, 0.99)
    if missing_fraction > 0:
        holes = rng.random(errors.shape) < missing_fraction
        holes[np.arange(n_tasks), np.argmin(errors, axis=1)] = False  # keep a best cell per task
        errors[holes] = np.nan
    return errors


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
