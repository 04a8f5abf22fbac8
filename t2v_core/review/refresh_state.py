"""What the last refresh of a zoo trained its recommender from: ``refresh/state.json`` under
the root keeps the digest of the recommender's inputs (the meta-dataset, the evaluation that
judges a new model, the recipe), so a refresh whose inputs did not change trains nothing."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.review.champion import Decision, Evaluation, data_digest
from t2v_core.review.reports import run_stamp
from t2v_core.storage import StorageRoot

STATE = "refresh/state.json"


@dataclass(frozen=True)
class RecommenderInputs:
    """The meta-dataset MODEL2VEC learns from, the evaluation that judges it, and the digest
    of both with the recipe."""

    data: MetaDataset
    evaluation: Evaluation
    digest: str

    @classmethod
    def load(cls, root: str | StorageRoot, probe_id: str, method: str, *, folds: str | int,
             seed: int, error_floor: float, epochs: int) -> RecommenderInputs:
        data = load_meta_dataset(root, probe_id, method, mode="probe")
        evaluation = Evaluation.of(data, folds, seed=seed, error_floor=error_floor)
        spec = {"data": data_digest(data), "evaluation": asdict(evaluation),
                "recipe": [epochs, seed]}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        return cls(data, evaluation, digest)


def last_state(root: StorageRoot) -> dict:
    """What the last refresh that got to a recommender left (empty: none did)."""
    return json.loads(root.read_bytes(STATE)) if root.exists(STATE) else {}


def record_state(root: StorageRoot, digest: str, model_version: str,
                 decision: Decision | None) -> None:
    state = {"digest": digest, "model_version": model_version, "finished": run_stamp(),
             "decision": decision and asdict(decision)}
    root.write_bytes_atomic(STATE, json.dumps(state, indent=2).encode())
