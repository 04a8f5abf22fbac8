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

Runs: one experiment per zoo (named after the storage root unless given), marked as model
training so MLflow's UI offers its runs view, and tagged with the zoo's name and (redacted) root.
A run is named ``<stage> · <zoo> · <UTC start time>`` and tagged ``t2v.kind`` (pipeline or
stage), ``t2v.stage``, ``t2v.zoo``, ``t2v.root``, the code version and, inside Ray, the Ray job
and submission ids. How stage runs group under pipeline runs is told in :func:`stage_run`.
Parameter and tag names that look like credentials are dropped before anything reaches the
server.

The page a reviewer should open is :func:`experiment_url`: MLflow 3.17's UI decides between its
GenAI pages (an empty trace "Overview" for this project) and its model-training pages with a
per-browser switch, default GenAI, that only the link's ``workflowType`` query overrides; the
experiment's ``mlflow.experimentKind`` tag is what earlier 3.x UIs and the kind selector read.
:func:`publish_to_pipeline` puts the newest Table 1 and recommendations on the pipeline run and
points the experiment's description at it.

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
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from t2v_core import __version__
from t2v_core.storage import StorageRoot, redact_uri

__all__ = [
    "DEFAULT_ROOT",
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING_KIND",
    "PARENT_RUN_ENV",
    "Tracking",
    "TrackingUnavailable",
    "code_version",
    "configure",
    "default_experiment_name",
    "experiment_url",
    "log_figures",
    "log_metrics",
    "log_params",
    "log_table",
    "log_task_counts",
    "metric_name",
    "pipeline_run",
    "publish_to_pipeline",
    "ray_tags",
    "record_stage",
    "require_reachable",
    "resolve_tracking",
    "safe_params",
    "stage_run",
    "table1_metrics",
    "tracked",
    "zoo_name",
]

log = logging.getLogger(__name__)

DEFAULT_ROOT = "./t2v-data"
#: A run id to nest stage runs under when no run is active (a pipeline spread over processes).
PARENT_RUN_ENV = "T2V_PARENT_RUN_ID"
#: The experiment tag MLflow's UI reads for the kind of work an experiment holds, and the
#: value of a model-training experiment (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` in the UI).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The UI's switch to its model-training pages, as a link's query (3.17 reads no tag for it).
_RUNS_VIEW_QUERY = "workflowType=machine_learning"
_NOTE_TAG = "mlflow.note.content"  # a run's or experiment's description in the UI
_LATEST_RUN_TAG = "t2v.latest_pipeline_run_id"
_MAX_EXPERIMENT_TAG = 20000
_REMOTE_HOME = "~/.t2v"
_SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_BAD_NAME_CHARS = re.compile(r"[^\w\-. /:]")
_MAX_PARAM = 6000
_MAX_TAG = 8000
_MAX_KEY = 250
_PROBE_TIMEOUT_S = 10.0


class TrackingUnavailable(MlflowException):
    """The tracking server does not answer; nothing was recorded, nothing else is affected."""


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where runs are recorded: the resolved store, and the experiment once configured."""

    tracking_uri: str
    artifact_location: str | None  # for a newly created experiment; None = the server decides
    experiment_name: str | None = None
    experiment_id: str | None = None
    zoo: str | None = None  # the zoo's short name, for run names
    root: str | None = None  # the storage root, credentials removed


#: Where :func:`configure` last pointed MLflow: run names and tags name this zoo.
_current: Tracking | None = None


# --------------------------------------------------------------------------- where runs go


def _uri_is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def require_reachable(uri: str, timeout_s: float = _PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` at once when the ``http(s)`` server ``uri`` cannot
    be connected to. MLflow's client retries a refused connection for minutes (7 retries with
    exponential backoff) before it fails, which would hold a finished job that long only to
    report that its record is missing. Any HTTP answer, an error status too, counts as up."""
    if uri.split(":", 1)[0].lower() not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered (auth, a proxy's 404): MLflow's own calls say what is wrong
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # a TLS handshake: it is up; MLflow has its own certificate settings
        raise TrackingUnavailable(
            f"MLflow server {redact_uri(uri)} is unreachable ({reason}); nothing was "
            "recorded there") from exc


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.resolve().as_posix()}"


def _artifact_uri(root: StorageRoot) -> str:
    """``<root>/mlartifacts``; credentials in an object-store URI stay out of the tracking
    store (the client authenticates through the usual AWS chain)."""
    return Path(root.join("mlartifacts")).as_uri() if root.local else redact_uri(root.join("mlartifacts"))


def resolve_tracking(
    root: str | os.PathLike[str] | StorageRoot | None = None,
    *,
    tracking_uri: str | None = None,
    artifact_location: str | None = None,
) -> Tracking:
    """The tracking store and experiment artifact location to use (see the module docstring).

    Creates the local directory that a default sqlite file needs; touches nothing remote.
    """
    store = _storage_root(root)
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


def _storage_root(root: str | os.PathLike[str] | StorageRoot | None) -> StorageRoot:
    return root if isinstance(root, StorageRoot) else StorageRoot(root or DEFAULT_ROOT)


def default_experiment_name(root: str | os.PathLike[str] | StorageRoot | None = None) -> str:
    """One experiment per zoo: named after its storage root (credentials removed)."""
    return f"task2vec-zoo:{redact_uri(_storage_root(root).uri)}"


def zoo_name(root: str | os.PathLike[str] | StorageRoot | None = None) -> str:
    """A zoo's short name for run names: a local root's last path component, or an object
    store's ``bucket/prefix`` (credentials and query removed)."""
    store = _storage_root(root)
    if store.local:
        return Path(store.path).name or store.path
    return redact_uri(store.uri).split("://", 1)[-1].split("?", 1)[0].rstrip("/")


def experiment_url(server_url: str, experiment_id: str) -> str:
    """The page of an experiment's runs on an MLflow server (``mlflow server`` / ``mlflow ui``):
    the link to hand a reviewer, because it opens the runs table even in a browser whose UI is
    switched to GenAI (MLflow 3.17's default, which shows an empty trace overview)."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{_RUNS_VIEW_QUERY}"


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


def _experiment_tags(store: StorageRoot) -> dict[str, str]:
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, "t2v.zoo": zoo_name(store),
            "t2v.root": redact_uri(store.uri)}


def _ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None,
                       tags: Mapping[str, str]) -> str:
    """The id of experiment ``name``, created with ``tags`` if missing; an existing one gets
    the tags it lacks or holds other values of (idempotent: an up-to-date one is not written)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location,
                                            tags=dict(tags))
        except MlflowException:  # created meanwhile by a concurrent job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in tags.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def configure(
    root: str | os.PathLike[str] | StorageRoot | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    artifact_location: str | None = None,
) -> Tracking:
    """Point MLflow (tracking and registry) at the resolved store and make the zoo's experiment
    active, creating it if needed and marking it as model training. Returns where runs go;
    raises :class:`TrackingUnavailable` within seconds when a tracking server does not answer."""
    global _current
    store = _storage_root(root)
    resolved = resolve_tracking(store, tracking_uri=tracking_uri, artifact_location=artifact_location)
    # MLflow copies the URIs it is given into the environment; undone, so the environment
    # stays the user's input and a later configure() (another zoo) is not redirected.
    with environment_kept("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(resolved.tracking_uri)
        mlflow.set_registry_uri(resolved.tracking_uri)
    name = experiment or default_experiment_name(store)
    require_reachable(resolved.tracking_uri)
    client = MlflowClient(resolved.tracking_uri, resolved.tracking_uri)
    exp_id = _ensure_experiment(client, name, resolved.artifact_location, _experiment_tags(store))
    mlflow.set_experiment(experiment_id=exp_id)
    _current = dataclasses.replace(resolved, experiment_name=name, experiment_id=exp_id,
                                   zoo=zoo_name(store), root=redact_uri(store.uri))
    where = redact_uri(resolved.tracking_uri)
    if _uri_is_server(resolved.tracking_uri):
        log.info("tracking to experiment %r, review at %s", name, experiment_url(where, exp_id))
    else:
        log.info("tracking to %s, experiment %r; review with `mlflow ui --backend-store-uri %s` "
                 "at %s", where, name, where, experiment_url("http://127.0.0.1:5000", exp_id))
    return _current


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

    Ray workers carry ``RAY_JOB_ID``; a job's entrypoint does not (the job supervisor strips
    it as an internal flag) but learns its job id from Ray once connected, and finds the
    submission id, the id ``ray job submit`` and the dashboard show, in the job config the
    supervisor hands it as ``RAY_JOB_CONFIG_JSON_ENV_VAR`` (``metadata.job_submission_id``).
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


def _run_name(kind: str) -> str:
    """``<kind> · <zoo> · <UTC time>``: runs of several zoos and refreshes told apart in one list."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return " · ".join(part for part in (kind, _current and _current.zoo, when) if part)


def _run_tags(tags: Mapping[str, Any] | None, **extra: str) -> dict[str, str]:
    zoo = {"t2v.zoo": _current.zoo, "t2v.root": _current.root} if _current and _current.zoo else {}
    merged = {"t2v.code_version": code_version(), **zoo, **ray_tags(), **extra}
    merged.update(safe_params(tags, limit=_MAX_TAG))
    return {k: v for k, v in merged.items() if v is not None}


@contextlib.contextmanager
def pipeline_run(
    name: str = "pipeline",
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """The parent run that groups a pipeline's stages; ends FAILED if the block raises.

    While it is open ``$T2V_PARENT_RUN_ID`` holds its id, so stages run as functions or as
    subprocesses inside it nest under this one run. A pipeline started inside another (an
    active run, or ``$T2V_PARENT_RUN_ID`` from a parent process) nests under it.
    """
    active = mlflow.active_run()
    parent = None if active else os.environ.get(PARENT_RUN_ENV) or None
    run_tags = _run_tags(tags, **{"t2v.kind": "pipeline", "t2v.pipeline": name})
    with (
        mlflow.start_run(run_name=_run_name(name), nested=active is not None,
                         parent_run_id=parent, tags=run_tags) as run,
        environment_kept(PARENT_RUN_ENV),
    ):
        os.environ[PARENT_RUN_ENV] = run.info.run_id
        mlflow.log_params({"code_version": code_version(), **safe_params(params)})
        yield run


def _submission_pipelines(experiment_id: str, submission_id: str) -> list[Any]:
    """Pipeline runs of one Ray job submission, oldest first."""
    found = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`t2v.kind` = 'pipeline' and tags.ray_submission_id = '{submission_id}'",
        max_results=50,
    )
    return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))


def _submission_pipeline_id(submission_id: str, name: str) -> str | None:
    """The id of the pipeline run of this Ray job submission, opened if it is the first stage.

    Two stages starting together may both open one: the younger is deleted, the oldest kept.
    """
    if _current is None or _current.experiment_id is None or "'" in submission_id:
        return None  # not configured here, or an id the search syntax cannot quote
    found = _submission_pipelines(_current.experiment_id, submission_id)
    if found:
        return found[0].info.run_id
    client = MlflowClient()
    tags = _run_tags(None, **{"t2v.kind": "pipeline", "t2v.pipeline": name})
    mine = client.create_run(_current.experiment_id, run_name=_run_name(name), tags=tags)
    client.log_param(mine.info.run_id, "code_version", code_version())
    oldest = _submission_pipelines(_current.experiment_id, submission_id)[0].info.run_id
    if oldest != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    return oldest


@contextlib.contextmanager
def _pipeline_status_follows_stage(run_id: str) -> Iterator[None]:
    """RUNNING while the stage runs; FAILED once any stage failed, FINISHED otherwise."""
    client = MlflowClient()
    if client.get_run(run_id).info.status != "FAILED":
        client.update_run(run_id, status="RUNNING")
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    if client.get_run(run_id).info.status != "FAILED":
        client.set_terminated(run_id, "FINISHED")


def _stage_parent(parent_run_id: str | None, pipeline: str, stack: contextlib.ExitStack) -> str | None:
    """Where a stage run goes when no run is active (steps 2 to 4 of :func:`stage_run`)."""
    given = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    if given:
        return given
    submission = ray_tags().get("ray_submission_id")
    parent = _submission_pipeline_id(submission, pipeline) if submission else None
    if parent:
        stack.enter_context(_pipeline_status_follows_stage(parent))
    return parent


@contextlib.contextmanager
def stage_run(
    name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    *,
    pipeline: str = "pipeline",
    parent_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A run for one job stage (``embed_tasks``, ``fill_matrix``, ...), under its pipeline's run.

    The parent is, in order:

    1. the active run: stages called as functions inside :func:`pipeline_run`;
    2. ``parent_run_id`` or ``$T2V_PARENT_RUN_ID``: set by :func:`pipeline_run` for the
       subprocesses it starts, or by hand for a pipeline spread over processes; its status is
       left to whoever opened it;
    3. inside a Ray job (``ray job submit``, a KubeRay RayJob: one refresh of the zoo), the
       pipeline run of that submission, found by its ``ray_submission_id`` tag or opened by the
       first stage as ``<pipeline> · <zoo> · <time>``: a refresh whose stages run as separate
       processes of one entrypoint still shows as one pipeline. That run is RUNNING while a
       stage runs, FAILED once one failed, FINISHED otherwise (needs :func:`configure`);
    4. none: a stage run by hand is a top-level run of its own, named after the stage, rather
       than a pipeline of one stage.

    Logs ``params`` (credential-like names dropped), the code version and Ray tags, and
    ``wall_time_s`` when the stage ends; a stage that raises ends FAILED. A tracking server
    that does not answer raises :class:`TrackingUnavailable` before the stage's block runs.
    """
    started = time.monotonic()
    require_reachable(mlflow.get_tracking_uri())
    stage_tags = _run_tags(tags, **{"t2v.stage": name, "t2v.kind": "stage"})
    with contextlib.ExitStack() as stack:
        parent_id = None if mlflow.active_run() else _stage_parent(parent_run_id, pipeline, stack)
        run = stack.enter_context(mlflow.start_run(
            run_name=_run_name(name), nested=True, parent_run_id=parent_id, tags=stage_tags))
        mlflow.log_params({"code_version": code_version(), **safe_params(params)})
        try:
            yield run
        finally:
            with contextlib.suppress(MlflowException):
                mlflow.log_metric("wall_time_s", time.monotonic() - started)


def tracked(name: str, params: Mapping[str, Any] | None = None, *,
            root: str | StorageRoot | None, enabled: bool = True, tracking_uri: str | None = None,
            pipeline: bool = False) -> contextlib.AbstractContextManager:
    """:func:`configure`, then the :func:`stage_run` (or :func:`pipeline_run`) ``name``; when
    not ``enabled``, a block that yields None and logs nothing."""
    if not enabled:
        return contextlib.nullcontext()
    configure(root, tracking_uri=tracking_uri)
    return (pipeline_run if pipeline else stage_run)(name, params)


def record_stage(root: str | StorageRoot, name: str, params: Mapping[str, Any],
                 metrics: Mapping[str, Any], *, enabled: bool = True,
                 tracking_uri: str | None = None) -> None:
    """Log a finished batch job as a stage run, where there is somewhere to log it.

    The batch jobs (embedding, matrix) run often and on clusters, so they log only when asked
    to by ``tracking_uri`` or $MLFLOW_TRACKING_URI, or when called inside a pipeline run (the
    demo, the refresh, or a stage started with $T2V_PARENT_RUN_ID). Tracking trouble is logged
    and never fails a job whose results are written.
    """
    if not enabled or not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                           or mlflow.active_run() or os.environ.get(PARENT_RUN_ENV)):
        return
    try:
        if mlflow.active_run() is None:
            configure(root, tracking_uri=tracking_uri)
        with stage_run(name, params):
            log_metrics(metrics)
    except Exception as exc:  # the stage's results are stored; the record is a convenience
        log.warning("could not log %s to MLflow: %s", name, exc)


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


# --------------------------------------------------------------------------- what a reviewer sees


def _top_choices_markdown(recommendations: Any, limit: int = 20) -> str:
    """The first-ranked expert of each task as a markdown table (at most ``limit`` tasks)."""
    import pandas as pd

    frame = pd.DataFrame(recommendations)
    if frame.empty or not {"task_id", "expert_id"} <= set(frame.columns):
        return ""
    # tasks in the frame's order, each with its best rank
    top = (frame.loc[frame.groupby("task_id", sort=False)["rank"].idxmin()] if "rank" in frame
           else frame.drop_duplicates("task_id"))
    columns = [c for c in ("task_id", "expert_id", "score", "true_error") if c in top.columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in top[columns].head(limit).itertuples(index=False):
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    more = len(top) - limit
    if more > 0:
        lines.append(f"\n… and {more} more tasks in `tables/recommendations.json`.")
    return "**Recommended expert per task**\n\n" + "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    tail = "\n\n… (cut here; the whole text is in the run's artifacts)"
    return text if len(text) <= limit else text[: limit - len(tail)] + tail


def _results_description(client: MlflowClient, run_id: str) -> str:
    """Table 1 and the top expert per task, from the run's own artifacts: results published
    by different stages (evaluate, recommend) add up rather than replace each other."""
    import pandas as pd

    present = {a.path for folder in (None, "tables") for a in client.list_artifacts(run_id, folder)}
    parts = []
    with environment_kept("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # two small files
        if "table1.md" in present:
            parts.append(mlflow.artifacts.load_text(f"runs:/{run_id}/table1.md").strip())
        if "tables/recommendations.json" in present:
            stored = mlflow.artifacts.load_dict(f"runs:/{run_id}/tables/recommendations.json")
            parts.append(_top_choices_markdown(pd.DataFrame(stored["data"], columns=stored["columns"])))
    return "\n\n".join(p for p in parts if p)


def _publish_target(client: MlflowClient, run_id: str | None) -> str:
    """``run_id``, else the pipeline run the active run belongs to (itself if a pipeline, a
    stage alone: itself), else ``$T2V_PARENT_RUN_ID``."""
    if run_id:
        return run_id
    active = mlflow.active_run()
    if active is None:
        given = os.environ.get(PARENT_RUN_ENV)
        if given:
            return given
        raise ValueError("no run to publish to: call publish_to_pipeline inside stage_run or "
                         f"pipeline_run, set ${PARENT_RUN_ENV}, or pass run_id")
    tags = client.get_run(active.info.run_id).data.tags
    if tags.get("t2v.kind") == "pipeline":
        return active.info.run_id
    return tags.get("mlflow.parentRunId") or active.info.run_id


def publish_to_pipeline(
    table1_markdown: str | None = None,
    recommendations: Any = None,
    *,
    figures: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> str:
    """Put the newest results where a reviewer lands, and return the run id they went to.

    The run (``run_id``, else the pipeline run the active run belongs to, else
    ``$T2V_PARENT_RUN_ID``; a stage run alone is its own) gets ``table1.md``,
    ``tables/recommendations.json`` and ``plots/<name>.png`` as artifacts, and as its
    description (the text its page opens with, also a column of the runs table) Table 1 and
    each task's first-ranked expert, from what the run holds now: a stage publishing Table 1
    and a later one publishing recommendations add up. The experiment's description becomes a link to that run
    followed by the same text, and its tag ``t2v.latest_pipeline_run_id`` the run id: the runs
    page shows the newest results before any run is opened.

    Call it where the results are made, inside that stage's run, e.g. in ``jobs/evaluate.py``::

        with tracking.stage_run("evaluate", params):
            ...
            tracking.publish_to_pipeline(report["markdown"])

    and in ``jobs/recommend.py`` with ``recommendations=frame`` (a recommendations frame:
    task_id, rank, expert_id, score[, true_error]). Either part may be None.
    """
    client = MlflowClient()
    target = _publish_target(client, run_id)
    if table1_markdown:
        client.log_text(target, table1_markdown, "table1.md")
    if recommendations is not None:
        log_table(recommendations, "recommendations", run_id=target)
    for name, fig in (figures or {}).items():
        client.log_figure(target, fig, f"plots/{name}.png")
    note = _results_description(client, target)
    if note:
        client.set_tag(target, _NOTE_TAG, _cut(note, _MAX_TAG))
    run = client.get_run(target)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    link = f"#/experiments/{run.info.experiment_id}/runs/{target}?{_RUNS_VIEW_QUERY}"
    header = f"**Latest results:** [{run.info.run_name}]({link}), published {when}."
    client.set_experiment_tag(run.info.experiment_id, _NOTE_TAG,
                              _cut(f"{header}\n\n{note}".strip(), _MAX_EXPERIMENT_TAG))
    client.set_experiment_tag(run.info.experiment_id, _LATEST_RUN_TAG, target)
    log.info("published the results to run %s (%s)", target, run.info.run_name)
    return target
