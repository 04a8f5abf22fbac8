"""The default recommender on new task folders: every expert screens a few images per class,
only the shortlisted experts run over all of each task's images, and the table shows every
score the ranking used.

The MLflow pyfunc (:mod:`t2v_core.review.recommender_model`) ranks from embeddings alone, since
the re-ranking needs the task's images and the experts' weights; this is the path that has both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from t2v_core.embedding.probes import build_probe
from t2v_core.matrix.experts import load_head
from t2v_core.matrix.features import FeatureCache, cell_features
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.recommend.shortlist import (
    SCORES,
    SCREEN_PER_CLASS,
    SCREEN_SCORES,
    ShortlistRecommender,
    screen_value,
)
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import scan_task
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec, read_experts

__all__ = ["COLUMNS", "SCREEN_COLUMNS", "new_task_recommendations", "shortlist_recommendations"]

log = logging.getLogger(__name__)

SCREEN_COLUMNS = [f"screen_{name}" for name in SCREEN_SCORES]
COLUMNS = ["task_id", "rank", "expert_id", "score", "model2vec_rank", *SCREEN_COLUMNS, "screen",
           "shortlisted", *SCORES, "fused"]


def _outputs(cache: FeatureCache, expert: ExpertSpec, task: TaskSpec, image_size: int,
             max_per_class: int | None) -> dict:
    """One expert's forward pass over the task's training images (cached under the root like
    the matrix job's): its features, its source head's probabilities (None without a head),
    and the labels."""
    def backbone():
        probe = build_probe(expert.arch, expert.weights_uri, seed=0, input_size=image_size)
        return probe.backbone, probe.probe_id

    feats = cell_features(cache, backbone, expert, task, "train", image_size,
                          max_per_class=max_per_class)
    head = load_head(expert.weights_uri)
    features = feats.features.astype(np.float64)
    return {"features": features, "labels": feats.labels,
            "source_probs": None if head is None else head.probabilities(features)}


def _screen(cache: FeatureCache, experts: Sequence[ExpertSpec], task: TaskSpec, image_size: int,
            per_class: int) -> tuple[dict[str, np.ndarray], float]:
    """Every expert's :data:`SCREEN_SCORES` on at most ``per_class`` training images per class
    of the task (NaN where an expert lacks what a score reads, such as LEEP's source head), and
    what it cost in expert forward passes."""
    outputs = [_outputs(cache, expert, task, image_size, per_class) for expert in experts]
    scores = {}
    for name in SCREEN_SCORES:
        key, score = SCORES[name]
        scores[name] = np.asarray([np.nan if o[key] is None else
                                   score(o[key], np.asarray(o["labels"])) for o in outputs])
    images = sum(len(o["labels"]) for o in outputs)
    return scores, images / max(task.n_train, 1)


def _task_scores(rec: ShortlistRecommender, head: np.ndarray, outputs: dict[int, dict]
                 ) -> dict[str, np.ndarray]:
    """Every score of the shortlisted experts (NaN elsewhere and where an expert lacks the
    output a score reads)."""
    out = {name: np.full(rec.n_experts_, np.nan) for name in SCORES}
    for e in head:
        for name, (key, score) in SCORES.items():
            if outputs[e][key] is not None:
                out[name][e] = score(outputs[e][key], np.asarray(outputs[e]["labels"]))
    return out


def shortlist_recommendations(rec: ShortlistRecommender, vectors, tasks: Sequence[TaskSpec],
                              experts: Sequence[ExpertSpec], root: StorageRoot, image_size: int,
                              *, max_per_class: int | None = None,
                              screen_per_class: int | None = SCREEN_PER_CLASS) -> pd.DataFrame:
    """One row per (task, expert), best first: the final rank, MODEL2VEC's p(expert | task)
    (``score``) and rank, the screen's scores and value (every expert on
    ``screen_per_class`` images per class; None: no screen), whether the expert was
    shortlisted and run, its LogME, LEEP and ridge LOO on the task (NaN unless shortlisted),
    and the fused value the shortlist was ordered by."""
    by_id = {e.expert_id: e for e in experts}
    missing = [e for e in rec.expert_ids_ if str(e) not in by_id]
    if missing:
        raise ValueError(f"the recommender ranks experts the zoo does not list: {missing[:5]}")
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    cache = FeatureCache(root)
    log_p = rec.log_p(vectors)
    zoo = [by_id[str(e)] for e in rec.expert_ids_]
    frames = []
    for j, task in enumerate(tasks):
        screen, screen_passes = (_screen(cache, zoo, task, image_size, screen_per_class)
                                 if screen_per_class else ({}, 0.0))
        screens = [screen_value(screen)] if screen else None
        head = rec.shortlist(vectors[j:j + 1], screens)[0]
        outputs = {int(e): _outputs(cache, zoo[e], task, image_size, max_per_class)
                   for e in head}
        scores = _task_scores(rec, head, outputs)
        ranking = rec.rerank(vectors[j:j + 1], [scores], screens)[0]
        rec.ledger.add([head.size + screen_passes])
        fused = np.full(rec.n_experts_, np.nan)
        fused[head] = rec.fused(scores)[head]
        nothing = np.full(rec.n_experts_, np.nan)
        m2v_rank = np.empty(rec.n_experts_, dtype=np.int64)
        m2v_rank[np.argsort(-log_p[j], kind="stable")] = np.arange(1, rec.n_experts_ + 1)
        frames.append(pd.DataFrame({
            "task_id": task.task_id,
            "rank": np.arange(1, rec.n_experts_ + 1),
            "expert_id": [str(rec.expert_ids_[e]) for e in ranking],
            "score": np.exp(log_p[j][ranking]),
            "model2vec_rank": m2v_rank[ranking],
            **{f"screen_{n}": screen.get(n, nothing)[ranking] for n in SCREEN_SCORES},
            "screen": (nothing if screens is None else screens[0])[ranking],
            "shortlisted": np.isin(ranking, head),
            **{name: values[ranking] for name, values in scores.items()},
            "fused": fused[ranking],
        }))
        log.info("%s: ran %d of %d experts (%s)", task.task_id, head.size, rec.n_experts_,
                 ", ".join(str(rec.expert_ids_[e]) for e in head))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def new_task_recommendations(model: Model2Vec, uris: Sequence[str], vectors, root: StorageRoot,
                             image_size: int, *, k: int = 3, max_per_class: int | None = None
                             ) -> pd.DataFrame:
    """The default recommender on the task folders ``uris`` (embedded as ``vectors``): the
    stored MODEL2VEC and the screen (every expert on a few images per class) shortlist ``k``
    experts per task, each runs over the task's training images, and their ridge LOO and LEEP
    (:data:`~t2v_core.recommend.shortlist.DEFAULT_RERANK`) re-rank them."""
    tasks = [scan_task(uri)[0] for uri in uris]
    rec = ShortlistRecommender.from_model(model, k)
    return shortlist_recommendations(rec, vectors, tasks, read_experts(root), root, image_size,
                                     max_per_class=max_per_class)
