"""Ray plumbing shared by the jobs: connecting (:func:`init_ray`, :func:`ray_session`), handing
workers the driver's storage settings (:func:`worker_runtime_env`), refusing a root that a
submitted job would lose (:func:`checked_root`), and collecting results as they complete."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import ray
from ray._private import ray_constants
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from t2v_core.storage import filesystem_for, is_local

log = logging.getLogger(__name__)

FORWARDED_PREFIXES = ("AWS_", "MLFLOW_")
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
LOOPBACK_IP = "127.0.0.1"
# Where a Ray node unpacks the working_dir of a submitted job: <session>/runtime_resources/
# working_dir_files/_ray_pkg_<hash>, removed once no job uses it.
_WORKING_DIR_COPIES = ("runtime_resources", "working_dir_files")


def _is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname or ""
    return host in _LOOPBACK


def init_ray(address: str | None = None, *, local_cpus: int | None = None,
             runtime_env: dict | None = None) -> bool:
    """Connect to (or start) Ray. Returns True when this call started it, so the caller knows
    whether to shut it down; an already connected Ray is used as it is. ``runtime_env`` (e.g.
    :func:`worker_runtime_env`) applies to every worker of this driver, Tune's trials too,
    which take no task-level one. A Ray started here listens on 127.0.0.1 only, so token auth
    is off (``RAY_AUTH_MODE=disabled``, unless set) for it and for one at a loopback address."""
    if ray.is_initialized():
        log.info("using the Ray this process is already connected to")
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    starts_local = address is None or address == "local"
    auth_off = False
    if (starts_local or (address != "auto" and _is_loopback(address))) \
            and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "disabled"
        auth_off = True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    job_env = {"runtime_env": runtime_env} if runtime_env else {}
    if starts_local:
        _start_loopback_ray(local_cpus, job_env)
        log.info("started a local Ray with %s CPU(s), listening on %s only%s",
                 ray.cluster_resources().get("CPU"), LOOPBACK_IP,
                 ": token auth disabled (RAY_AUTH_MODE=disabled)" if auth_off else "")
    else:
        if auth_off:
            log.info("joining Ray at the loopback address %s: token auth disabled "
                     "(RAY_AUTH_MODE=disabled)", address)
        ray.init(address=address, configure_logging=False, **job_env)
        log.info("joined the Ray cluster (%s CPU, %s GPU)",
                 ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, *, local_cpus: int | None = None,
                runtime_env: dict | None = None) -> Iterator[None]:
    """:func:`init_ray` for the block, shutting down afterwards a Ray that it started."""
    started = init_ray(address, local_cpus=local_cpus, runtime_env=runtime_env)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _start_loopback_ray(local_cpus: int | None, job_env: dict) -> None:
    """A new single-node Ray whose GCS, raylet, agents and workers listen on 127.0.0.1 only.

    Ray turns a loopback ``_node_ip_address`` into the machine's outward address, and then
    binds its servers on every interface, unless its multi-node mode is off; that switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) is read once, when ray is imported, so it is
    turned off here for the start alone. A Ray that still ended up elsewhere is shut down
    rather than left running without a token.
    """
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=local_cpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK_IP, configure_logging=False, **job_env)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK_IP:
        ray.shutdown()
        raise RuntimeError(f"the local Ray came up on {node_ip}, not {LOOPBACK_IP}; "
                           "refusing to run it where other machines can reach it")


def worker_runtime_env(
    forward: bool = True, prefixes: Sequence[str] = FORWARDED_PREFIXES
) -> dict | None:
    """A runtime_env carrying the driver's variables with ``prefixes`` (None when there is
    nothing to forward). Its ``env_vars`` merge with a job's own runtime_env, so a
    ``working_dir`` given to ``ray job submit`` is kept. Variables the submitted job's
    runtime_env already sets reach every worker of the job through it, and are left out:
    ``ray.init`` refuses a runtime_env that names one of them again. Only the names are
    logged; the values show in the Ray dashboard, so clusters with instance roles or mounted
    secrets pass ``--no-forward-env``."""
    if not forward:
        return None
    job = (submitted_job_config() or {}).get("runtime_env") or {}
    from_job = set(job.get("env_vars") or {})
    env = {k: v for k, v in os.environ.items()
           if k.startswith(tuple(prefixes)) and k not in from_job}
    if not env:
        return None
    log.info("passing %s to the workers (values not logged)", ", ".join(sorted(env)))
    return {"env_vars": env}


def submitted_job_config() -> dict | None:
    """The job config Ray's job supervisor hands the entrypoint of ``ray job submit`` (its
    runtime_env and metadata), or None when this process was not started that way. Ray
    removes ``RAY_JOB_ID`` from the entrypoint's environment; this variable is what it sets."""
    text = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return json.loads(text) if text else None


def _in_working_dir_copy(path: str) -> bool:
    parts = os.path.normpath(path).split(os.sep)
    n = len(_WORKING_DIR_COPIES)
    return any(tuple(parts[i : i + n]) == _WORKING_DIR_COPIES for i in range(len(parts)))


def checked_root(root: str) -> str:
    """``root`` unchanged, unless it is a local path inside Ray's copy of a submitted job's
    working_dir, or a relative path in a submitted job (relative to a directory Ray chose).
    Such a root is refused with what to pass instead: the job would report success and
    its results would be deleted with the copy."""
    if not is_local(root):
        return root
    path = filesystem_for(root)[1]
    relative = not os.path.isabs(os.path.expanduser(root.removeprefix("file://")))
    if _in_working_dir_copy(path):
        where = "inside Ray's temporary copy of the job's working_dir, deleted after the job"
    elif relative and submitted_job_config() is not None:
        where = f"relative to {os.getcwd()}, the directory Ray started this job in"
    else:
        return root
    raise argparse.ArgumentTypeError(
        f"storage root {root!r} resolves to {path}, {where}: pass an absolute path on storage "
        "every node shares (e.g. /mnt/shared/t2v-data) or s3://bucket/prefix")


def iter_ready(
    refs: Iterable[ray.ObjectRef], *, timeout_s: float | None = None
) -> Iterator[list[ray.ObjectRef]]:
    """Yield the refs that completed since the last yield, as soon as at least one has, and an
    empty list every ``timeout_s`` seconds while none has."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
        if ready and pending:
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        yield ready


def get_or_error(ref: ray.ObjectRef) -> tuple[object, BaseException | None]:
    """``(value, None)``, or ``(None, error)`` where the error is the task's own exception when
    Ray has it (``RayTaskError.cause``) and Ray's error otherwise (worker or node died, ...)."""
    try:
        return ray.get(ref), None
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        return None, cause if isinstance(cause, BaseException) else exc
    except ray.exceptions.RayError as exc:
        return None, exc


def cancel(refs: Iterable[ray.ObjectRef]) -> None:
    """Best-effort cancel of tasks that are no longer wanted (the driver is giving up)."""
    for ref in refs:
        try:
            ray.cancel(ref, force=False)
        except Exception as exc:  # already finished, or its owner is gone
            log.debug("cancel %s: %s", ref, exc)
