"""Trained MODEL2VEC recommenders under a storage root, one folder per version.

Layout::

    model2vec/<version>/model.pt        the model (:meth:`Model2Vec.save`, weights-only torch file)
    model2vec/<version>/metadata.json   probe, method, task and expert ids, training metrics
    model2vec/LATEST                    the newest version's name

A version is ``<UTC time>-<hash of the training data>``, so names sort by time and say whether
two models saw the same data. The model and its metadata are written before LATEST moves, so a
reader following LATEST never finds a half-saved version. The training job, the recommend job
and notebooks all go through this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import numpy as np

from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.storage import StorageRoot

MODEL_DIR = "model2vec"
LATEST = f"{MODEL_DIR}/LATEST"
MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


def _root(root: StorageRoot | str) -> StorageRoot:
    return root if isinstance(root, StorageRoot) else StorageRoot(root)


def _rel(version: str, name: str) -> str:
    return f"{MODEL_DIR}/{version}/{name}"


def model_version(data: MetaDataset, now: dt.datetime | None = None) -> str:
    """``<UTC time to the second>-<8 hex digits of the embeddings, errors and ids>``."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(data.embeddings).tobytes())
    digest.update(np.nan_to_num(data.errors, nan=-1.0).tobytes())
    digest.update("\n".join(data.task_ids + data.expert_ids).encode())
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{digest.hexdigest()[:8]}"


def save_model(root: StorageRoot | str, model: Model2Vec, data: MetaDataset, metrics: dict,
               version: str | None = None) -> str:
    """Write model + metadata under a new version (default :func:`model_version`) and point
    LATEST at it; returns the version."""
    root = _root(root)
    version = version or model_version(data)
    model.save(root.join(_rel(version, MODEL_FILE)))
    meta = {"version": version, "probe_id": data.probe_id, "method": data.method,
            "task_ids": list(data.task_ids), "expert_ids": list(data.expert_ids),
            "metrics": metrics}
    root.write_bytes_atomic(_rel(version, METADATA_FILE), json.dumps(meta, indent=2).encode())
    root.write_bytes_atomic(LATEST, version.encode())
    return version


def latest_version(root: StorageRoot | str) -> str | None:
    """The version LATEST names, or None when no model was saved under ``root``."""
    root = _root(root)
    if not root.exists(LATEST):
        return None
    return root.read_bytes(LATEST).decode().strip()


def list_versions(root: StorageRoot | str) -> list[str]:
    """Every complete stored version (model and metadata present), oldest first."""
    root = _root(root)
    versions = [rel.rsplit("/", 1)[-1] for rel in root.list(MODEL_DIR)]
    return sorted(v for v in versions
                  if root.exists(_rel(v, MODEL_FILE)) and root.exists(_rel(v, METADATA_FILE)))


def load_model(root: StorageRoot | str, version: str | None = None) -> tuple[Model2Vec, dict]:
    """The stored model of ``version`` (default: LATEST) and its metadata."""
    root = _root(root)
    if version is None:
        version = latest_version(root)
        if version is None:
            raise FileNotFoundError(f"no trained MODEL2VEC under {root!r}: run jobs.train_model2vec")
    if not root.exists(_rel(version, METADATA_FILE)):
        known = ", ".join(list_versions(root)) or "none"
        raise FileNotFoundError(f"no MODEL2VEC version {version!r} under {root!r} (stored: {known})")
    meta = json.loads(root.read_bytes(_rel(version, METADATA_FILE)))
    return Model2Vec.load(root.join(_rel(version, MODEL_FILE))), meta
