"""The refresh of a zoo: its plan and its steps, what it did, and what the last refresh
trained its recommender from. ``refresh/state.json`` under the root keeps the digest of the
recommender's inputs (the meta-dataset, the evaluation that judges a new model, the recipe),
so a refresh whose inputs did not change trains nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from t2v_core.embedding.probes import Probe
from t2v_core.lease import LeaseError
from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.review.champion import Decision, Evaluation, data_digest
from t2v_core.review.reports import run_stamp
from t2v_core.storage import StorageRoot
from t2v_core.zoo.register import RegisterResult

STATE = "refresh/state.json"


@dataclass(frozen=True)
class RefreshPlan:
    """What a refresh found to do: the probe, the tasks it registered, the experts to train,
    the tasks to embed and the number of cells to fill."""

    probe: Probe
    registered: RegisterResult | None
    experts: tuple[str, ...]
    embeddings: tuple[str, ...]
    cells: int

    @property
    def fans_out(self) -> bool:
        return bool(self.experts or self.embeddings or self.cells)


@dataclass(frozen=True)
class RefreshResult:
    """What a refresh did: ids of the tasks registered (added or changed), experts trained and
    tasks embedded, cells filled, the new model's version, the champion decision (None: no new
    model, or tracking off) and what failed (the rest is done). All empty when up to date."""

    up_to_date: bool
    registered: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    embedded: tuple[str, ...] = ()
    cells: int = 0
    model_version: str | None = None
    decision: Decision | None = None
    problems: tuple[str, ...] = ()


class StepFailed(RuntimeError):
    """A step of the refresh raised; the message names it, ``__cause__`` is the error."""


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Errors of the block as :class:`StepFailed` naming step ``name`` (a lost lease as is)."""
    try:
        yield
    except (LeaseError, StepFailed):
        raise
    except Exception as exc:
        raise StepFailed(f"{name} failed: {type(exc).__name__}: {exc}") from exc


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
