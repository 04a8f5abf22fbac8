"""MODEL2VEC as an MLflow ``pyfunc`` model in the Model Registry.

Registering the recommender as a pyfunc lets anyone load and call it the MLflow way
(``mlflow.pyfunc.load_model("models:/task2vec-recommender@champion").predict(df)``, or
``mlflow models serve``) without knowing the Model2Vec API. The only artifact is the file
:meth:`Model2Vec.save` writes, read back with ``torch.load(weights_only=True)``: loading a
registered version unpickles nothing: the wrapper is logged as code (MLflow's "models from
code", a three-line file that imports :class:`RecommenderModel`), not as a cloudpickle.

Input: a DataFrame with a column ``embedding`` (one list of floats per task, the TASK2VEC
embedding) and an optional ``task_id``. Output: one row per (task, expert), best first:
task_id, rank (1 = best), expert_id, score (p(expert | task), sums to 1 over a task's
experts), distance (d_asym, lower = better). The param ``top_k`` keeps the first k per task.

The model ranks by MODEL2VEC alone. The default recommender of ``jobs.recommend`` re-ranks
MODEL2VEC's shortlist by the shortlisted experts' scores on the task's images
(:mod:`t2v_core.recommend.shortlist_table`), which needs the images and the experts' weights,
so it is not part of a model served from embeddings.
"""

from __future__ import annotations

import importlib.metadata
import logging
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import DataType
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from t2v_core.recommend.model2vec import Model2Vec

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_NAME",
    "RecommenderModel",
    "load_recommender",
    "recommendations_frame",
    "recommender_signature",
    "register_recommender",
]

log = logging.getLogger(__name__)

DEFAULT_NAME = "task2vec-recommender"
DEFAULT_ALIAS = "champion"
ARTIFACT_KEY = "model2vec"
_COLUMNS = ["task_id", "rank", "expert_id", "score", "distance"]
# What the wrapper needs at load time; pinned to the versions it was logged with.
_MODEL_CODE = """\
import mlflow

from t2v_core.review.recommender_model import RecommenderModel

mlflow.models.set_model(RecommenderModel())
"""
_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "scikit-learn", "numba", "scipy")


def _embeddings_from_frame(frame: pd.DataFrame) -> np.ndarray:
    if "embedding" not in frame.columns:
        raise ValueError("input needs a column 'embedding' (one list of floats per task)")
    rows = [np.asarray(v, dtype=np.float64).reshape(-1) for v in frame["embedding"]]
    if not rows:
        return np.zeros((0, 0))
    sizes = {r.size for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"embeddings of different sizes: {sorted(sizes)}")
    return np.stack(rows)


def _task_ids(frame: pd.DataFrame) -> list[str]:
    """``task_id`` where given, else the row's position."""
    given = frame["task_id"].tolist() if "task_id" in frame.columns else [None] * len(frame)
    return [str(i) if t is None or (isinstance(t, float) and np.isnan(t)) else str(t)
            for i, t in enumerate(given)]


def recommendations_frame(
    model: Model2Vec,
    embeddings,
    task_ids: Sequence[Any] | None = None,
    *,
    top_k: int | None = None,
    errors: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Ranked experts for every task: task_id, rank, expert_id, score, distance.

    ``errors`` (a matrix table with task_id, expert_id, test_error) adds ``true_error`` where
    the cell is known, for review tables and the top-k plots.
    """
    emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    ids = [str(t) for t in (range(emb.shape[0]) if task_ids is None else task_ids)]
    if len(ids) != emb.shape[0]:
        raise ValueError(f"{len(ids)} task ids for {emb.shape[0]} embeddings")
    experts = np.asarray([str(e) for e in model.expert_ids_], dtype=object)
    if emb.shape[0] == 0:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            _COLUMNS, ["object", "int64", "object", "float64", "float64"], strict=True)})
    dist = model.distances(emb)
    order = np.argsort(dist, axis=1, kind="stable")  # the same order as Model2Vec.rank
    logits = -dist / model.tau_
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    k = order.shape[1] if not top_k or top_k <= 0 else min(int(top_k), order.shape[1])
    order = order[:, :k]
    rows = np.arange(emb.shape[0])[:, None]
    out = pd.DataFrame({
        "task_id": np.repeat(np.asarray(ids, dtype=object), k),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), emb.shape[0]),
        "expert_id": experts[order].ravel(),
        "score": probs[rows, order].ravel(),
        "distance": dist[rows, order].ravel(),
    })
    if errors is not None:
        known = errors[["task_id", "expert_id", "test_error"]].astype(
            {"task_id": str, "expert_id": str}
        ).drop_duplicates(["task_id", "expert_id"], keep="last")
        out = out.merge(known, on=["task_id", "expert_id"], how="left", sort=False)
        out = out.rename(columns={"test_error": "true_error"})
    return out


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the Model2Vec artifact and ranks experts for task embeddings."""

    def load_context(self, context) -> None:
        self.model = Model2Vec.load(context.artifacts[ARTIFACT_KEY])

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        top_k = int((params or {}).get("top_k") or 0)
        return recommendations_frame(
            self.model, _embeddings_from_frame(frame), _task_ids(frame), top_k=top_k
        )


def recommender_signature() -> ModelSignature:
    """Input: embedding (list of doubles), optional task_id; output: the ranked table."""
    return ModelSignature(
        inputs=Schema([
            ColSpec(Array(DataType.double), "embedding"),
            ColSpec(DataType.string, "task_id", required=False),
        ]),
        outputs=Schema([
            ColSpec(DataType.string, "task_id"),
            ColSpec(DataType.long, "rank"),
            ColSpec(DataType.string, "expert_id"),
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.double, "distance"),
        ]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, 0)]),
    )


def _requirements() -> list[str]:
    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def _default_example(model: Model2Vec) -> pd.DataFrame:
    """The trivial task t0 as the example input: valid for the model, and no zoo data."""
    t0 = np.asarray(model.t0_, dtype=np.float64).reshape(-1)
    return pd.DataFrame({"task_id": ["t0"], "embedding": [t0.tolist()]})


def register_recommender(
    model: Model2Vec,
    name: str = DEFAULT_NAME,
    alias: str | None = DEFAULT_ALIAS,
    input_example: pd.DataFrame | None = None,
    *,
    artifact_name: str = "recommender",
    bundle_code: bool = False,
    tags: dict[str, str] | None = None,
) -> int:
    """Log ``model`` as a pyfunc on the active run (a new run if none is active), register it
    as a new version of ``name``, point ``alias`` at it, and return the version number.

    ``bundle_code`` copies the ``t2v_core`` package into the model so that it loads where the
    package is not installed (``mlflow models serve``); by default the loading environment
    provides it (jobs, notebooks).
    """
    example = _default_example(model) if input_example is None else input_example
    code_paths = [str(Path(__file__).resolve().parents[1])] if bundle_code else None
    with tempfile.TemporaryDirectory(prefix="t2v-recommender-") as tmp, ExitStack() as stack:
        path = Path(tmp) / "model2vec.pt"
        model.save(path)
        code = Path(tmp) / "recommender_code.py"
        code.write_text(_MODEL_CODE)
        if mlflow.active_run() is None:
            stack.enter_context(mlflow.start_run(run_name="register_recommender"))
        info = mlflow.pyfunc.log_model(
            name=artifact_name,
            python_model=str(code),
            artifacts={ARTIFACT_KEY: str(path)},
            signature=recommender_signature(),
            input_example=example,
            registered_model_name=name,
            pip_requirements=_requirements(),
            code_paths=code_paths,
            tags=tags,
        )
    version = int(info.registered_model_version)
    client = MlflowClient()
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    log.info("registered %s version %d%s", name, version, f" as @{alias}" if alias else "")
    return version


def load_recommender(uri: str = f"models:/{DEFAULT_NAME}@{DEFAULT_ALIAS}"):
    """The registered recommender as a ``mlflow.pyfunc.PyFuncModel``."""
    return mlflow.pyfunc.load_model(uri)
