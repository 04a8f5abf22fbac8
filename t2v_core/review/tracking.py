"""Thin MLflow helpers: where runs go, one experiment per zoo, nested stage runs, safe params.

Where runs go (first match wins):

1. an explicit ``tracking_uri`` argument (a job's ``--tracking-uri``);
2. the ``MLFLOW_TRACKING_URI`` environment variable (a shared ``mlflow server``; its own
   artifact store, e.g. S3 behind ``--artifacts-destination``, holds the artifacts);
3. a local default that needs no configuration: for a local storage root, a sqlite file
   ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``. For an ``s3://`` root a
   sqlite file cannot live in the bucket, so the metadata goes to ``~/.t2v/mlflow.db`` on
   the machine that runs the job and the artifacts to ``<root>/mlartifacts`` on S3 (the
   client writes them with boto3, which honours ``AWS_ENDPOINT_URL`` /
   ``MLFLOW_S3_ENDPOINT_URL``). Point several machines at one server instead when their
   runs must be seen together.

Runs: one experiment per zoo (named after the storage root unless given), one parent run per
pipeline and one nested run per job stage (:func:`stage_run`). Every run is tagged with the
code version and, inside Ray, the Ray job id. Parameter and tag names that look like
credentials are dropped before anything reaches the server.

This module sets MLflow's process-wide tracking URI and active experiment
(:func:`configure`): jobs and notebooks are single-purpose processes that log to one place.
It leaves the environment as it found it, so subprocesses (Ray workers) that log call
:func:`configure` with the same root or URI themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from t2v_core import __version__
from t2v_core.storage import StorageRoot, redact_uri

__all__ = [
    "DEFAULT_ROOT",
    "PARENT_RUN_ENV",
    "Tracking",
    "code_version",
    "configure",
    "default_experiment_name",
    "log_figures",
    "log_metrics",
    "log_params",
    "log_table",
    "log_task_counts",
    "metric_name",
    "pipeline_run",
    "ray_tags",
    "resolve_tracking",
    "safe_params",
    "stage_run",
    "table1_metrics",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = "./t2v-data"
#: A run id to nest stage runs under when no run is active (a pipeline spread over processes).
PARENT_RUN_ENV = "T2V_PARENT_RUN_ID"
_REMOTE_HOME = "~/.t2v"
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_BAD_NAME_CHARS = re.compile(r"[^\w\-. /:]")
_MAX_PARAM = 6000
_MAX_TAG = 8000
_MAX_KEY = 250


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where runs are recorded: the resolved store, and the experiment once configured."""

    tracking_uri: str
    artifact_location: str | None  # for a newly created experiment; None = the server decides
    experiment_name: str | None = None
    experiment_id: str | None = None


# --------------------------------------------------------------------------- where runs go


def _uri_is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.resolve().as_posix()}"


def _artifact_uri(root: StorageRoot) -> str:
    return Path(root.join("mlartifacts")).as_uri() if root.local else root.join("mlartifacts")


def resolve_tracking(
    root: str | os.PathLike[str] | StorageRoot | None = None,
    *,
    tracking_uri: str | None = None,
    artifact_location: str | None = None,
) -> Tracking:
    """The tracking store and experiment artifact location to use (see the module docstring).

    Creates the local directory that a default sqlite file needs; touches nothing remote.
    """
    store = root if isinstance(root, StorageRoot) else StorageRoot(root or DEFAULT_ROOT)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        if artifact_location is None and not _uri_is_server(uri):
            artifact_location = _artifact_uri(store)  # a database URI: artifacts beside the data
        return Tracking(uri, artifact_location)
    if store.local:
        home = Path(store.path)
    else:
        home = Path(os.path.expanduser(_REMOTE_HOME))
    home.mkdir(parents=True, exist_ok=True)
    return Tracking(_sqlite_uri(home / "mlflow.db"), artifact_location or _artifact_uri(store))


def default_experiment_name(root: str | os.PathLike[str] | StorageRoot | None = None) -> str:
    """One experiment per zoo: named after its storage root (credentials removed)."""
    store = root if isinstance(root, StorageRoot) else StorageRoot(root or DEFAULT_ROOT)
    return f"task2vec-zoo:{redact_uri(store.uri)}"


@contextlib.contextmanager
def environment_kept(*names: str) -> Iterator[None]:
    """The environment variables ``names`` as they were before the block, whatever the block
    set or removed: libraries that configure themselves through the environment (MLflow,
    Ray Tune) then leave no trace on the caller's process."""
    saved = {n: os.environ.get(n) for n in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure(
    root: str | os.PathLike[str] | StorageRoot | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    artifact_location: str | None = None,
) -> Tracking:
    """Point MLflow (tracking and registry) at the resolved store and make the zoo's experiment
    active, creating it if needed. Returns where runs will go."""
    resolved = resolve_tracking(root, tracking_uri=tracking_uri, artifact_location=artifact_location)
    # MLflow copies the URIs it is given into the environment; undone, so the environment
    # stays the user's input and a later configure() (another zoo) is not redirected.
    with environment_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(resolved.tracking_uri)
        mlflow.set_registry_uri(resolved.tracking_uri)
    name = experiment or default_experiment_name(root)
    client = MlflowClient(resolved.tracking_uri, resolved.tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = client.create_experiment(name, artifact_location=resolved.artifact_location)
        except MlflowException:  # created meanwhile by a concurrent job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    log.info("tracking to %s, experiment %r", redact_uri(resolved.tracking_uri), name)
    return dataclasses.replace(resolved, experiment_name=name, experiment_id=exp_id)


# --------------------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    """The checkout's commit (``+dirty`` when tracked files changed); ``T2V_GIT_SHA`` wins,
    for clusters whose working dir was shipped without ``.git``."""
    env = os.environ.get("T2V_GIT_SHA")
    if env:
        return env
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if sha and dirty else sha or None


def code_version() -> str:
    """Package version plus the git commit when known, e.g. ``0.1.0+g1a2b3c4d5e6f``."""
    sha = _git_sha()
    if not sha:
        return __version__
    short, _, dirty = sha.partition("+")
    return f"{__version__}+g{short[:12]}" + (".dirty" if dirty else "")


def ray_tags() -> dict[str, str]:
    """``ray_job_id`` (and ``ray_submission_id`` under ``ray job submit``) when inside Ray.

    Ray is only asked if the process already imported it: this library does not start Ray.
    """
    tags: dict[str, str] = {}
    job_id = os.environ.get("RAY_JOB_ID")
    ray = sys.modules.get("ray")
    if not job_id and ray is not None:
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                job_id = ray.get_runtime_context().get_job_id()
    if job_id:
        tags["ray_job_id"] = str(job_id)
    # The job supervisor hands the driver its job config, submission id included, this way.
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
        if meta.get("job_submission_id"):
            tags["ray_submission_id"] = str(meta["job_submission_id"])
    return tags


# --------------------------------------------------------------------------- safe values


def _is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _as_text(value: Any, limit: int) -> str:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, str):
        text = redact_uri(value)
    elif isinstance(value, list | tuple):
        text = json.dumps([redact_uri(v) if isinstance(v, str) else v for v in value], default=str)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safe_params(params: Mapping[str, Any] | None, *, limit: int = _MAX_PARAM) -> dict[str, str]:
    """Params as MLflow accepts them: nested mappings flattened (``a.b``), values as text
    (URIs without ``user:password@``, cut at MLflow's length limit), None left out, and any
    name that looks like a credential (KEY, SECRET, TOKEN, PASSWORD) dropped — on the side of
    caution, so a harmless ``key_columns`` goes too."""
    out: dict[str, str] = {}
    dropped = []
    for name, value in _flatten(params or {}).items():
        if _is_secret(name):
            dropped.append(name)
            continue
        if value is None:
            continue
        out[str(name)[:_MAX_KEY]] = _as_text(value, limit)
    if dropped:
        log.warning("not logging %d credential-like name(s): %s", len(dropped), sorted(dropped))
    return out


def metric_name(name: str) -> str:
    """``name`` with characters MLflow rejects in metric names replaced by ``_``."""
    return _BAD_NAME_CHARS.sub("_", str(name)).strip("/")[:_MAX_KEY] or "_"


def _as_metric(value: Any) -> float | None:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


# --------------------------------------------------------------------------- runs


def _run_tags(tags: Mapping[str, Any] | None, **extra: str) -> dict[str, str]:
    merged = {"t2v.code_version": code_version(), **ray_tags(), **extra}
    merged.update(safe_params(tags, limit=_MAX_TAG))
    return merged


@contextlib.contextmanager
def pipeline_run(
    name: str = "pipeline",
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """The parent run that groups a pipeline's stages; ends FAILED if the block raises."""
    with mlflow.start_run(run_name=name, tags=_run_tags(tags, **{"t2v.kind": "pipeline"})) as run:
        mlflow.log_params({"code_version": code_version(), **safe_params(params)})
        yield run


@contextlib.contextmanager
def stage_run(
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    pipeline: str = "pipeline",
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one job stage (``embed_tasks``, ``fill_matrix``, ...).

    The parent is, in order: the active run; ``parent_run_id`` or ``$T2V_PARENT_RUN_ID`` (a
    pipeline run opened by another process, left open); or a new pipeline run named
    ``pipeline`` that ends with the stage. Logs ``params`` (credential-like names dropped),
    the code version and Ray tags, and ``wall_time_s`` when the stage ends; a stage that
    raises ends FAILED, and so does a pipeline run opened for it.
    """
    started = time.monotonic()
    stage_tags = _run_tags(tags, **{"t2v.stage": name, "t2v.kind": "stage"})
    with contextlib.ExitStack() as stack:
        parent_id = None
        if mlflow.active_run() is None:
            parent_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
            if parent_id is None:
                stack.enter_context(pipeline_run(pipeline))
        run = stack.enter_context(
            mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_id, tags=stage_tags)
        )
        mlflow.log_params({"code_version": code_version(), **safe_params(params)})
        try:
            yield run
        finally:
            with contextlib.suppress(MlflowException):
                mlflow.log_metric("wall_time_s", time.monotonic() - started)


def log_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Log params on the active run through :func:`safe_params`; returns what was logged."""
    clean = safe_params(params)
    if clean:
        mlflow.log_params(clean)
    return clean


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numeric entries of ``metrics`` (nested mappings flattened, names sanitised);
    None and non-numbers are skipped. Returns what was logged."""
    clean = {}
    for name, value in _flatten(metrics).items():
        number = _as_metric(value)
        if number is not None:
            clean[metric_name(name)] = number
    if clean:
        mlflow.log_metrics(clean, step=step)
    return clean


def log_task_counts(done: int, failed: int, skipped: int | None = None) -> dict[str, float]:
    """The progress figures every fan-out stage reports: tasks done, failed (and skipped)."""
    counts = {"tasks_done": done, "tasks_failed": failed, "tasks_skipped": skipped}
    return log_metrics({k: v for k, v in counts.items() if v is not None})


def table1_metrics(result: Any) -> dict[str, float]:
    """Flat Table-1 metrics from an evaluation result (``reports[selector].by_meta_task``):
    ``table1/<meta task>/<selector>/<metric>``, one per scalar score and per k of regret@k."""
    out: dict[str, float] = {}
    for selector, report in getattr(result, "reports", {}).items():
        for meta_task, scores in report.by_meta_task.items():
            values = dataclasses.asdict(scores) if dataclasses.is_dataclass(scores) else scores
            for key, value in values.items():
                if isinstance(value, Mapping):
                    for k, v in value.items():
                        out[metric_name(f"table1/{meta_task}/{selector}/{key}@{k}")] = v
                else:
                    out[metric_name(f"table1/{meta_task}/{selector}/{key}")] = value
    return {k: float(v) for k, v in out.items() if _as_metric(v) is not None}


def log_figures(figures: Mapping[str, Any], artifact_dir: str = "plots", dpi: int = 100) -> list[str]:
    """Log matplotlib figures as ``<artifact_dir>/<name>.png`` on the active run."""
    paths = []
    for name, fig in figures.items():
        path = f"{artifact_dir.strip('/')}/{name}.png" if artifact_dir else f"{name}.png"
        mlflow.log_figure(fig, path, save_kwargs={"dpi": dpi})
        paths.append(path)
    return paths


def log_table(data: Any, name: str, run_id: str | None = None) -> str:
    """Log a table (e.g. recommendations: task, rank, expert, score, true error) that the
    MLflow UI can sort and filter; stored as ``tables/<name>.json``. Non-finite floats become
    nulls, because the artifact is JSON."""
    import pandas as pd

    frame = pd.DataFrame(data).copy()
    for col in frame.columns:
        if pd.api.types.is_float_dtype(frame[col]):
            frame[col] = frame[col].astype(object).where(
                frame[col].map(lambda v: v is not None and math.isfinite(v)), None
            )
    artifact = name if name.endswith(".json") else f"tables/{name}.json"
    mlflow.log_table(data=frame, artifact_file=artifact, run_id=run_id)
    return artifact
