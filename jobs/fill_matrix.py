"""Fill the task × expert performance matrix with Ray Tune.

    python -m jobs.fill_matrix --root ./t2v-data|s3://bucket/prefix [--mode probe|finetune]
        [--tasks PAT,..] [--experts PAT,..] [--shard i/n] [--num-samples K] [--max-cells N]
        [--max-per-class N]

Every (task, expert) cell without a current row in ``matrix/`` is trained with each of
``--num-samples`` seeded configurations, and its best one on a validation split is written as
one row (:mod:`t2v_core.matrix.cells`). Units of work are Tune trials (``--layout``): batched
(many cells of one expert, all configurations) or one (cell, configuration) each. No ASHA: its
rungs would compare errors of *different* cells. The experiment lives under
``<root>/tune/<name>``; a re-run of the same selection resumes an unfinished one
(:mod:`t2v_core.matrix.experiment`). Rows are written as trials complete, so a killed job loses
at most its running trials.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.logger import JsonLoggerCallback
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import (
    config_reader,
    opt,
    record_stage,
    root_option,
    run_main,
    shard_option,
    tracking_uri_option,
)
from jobs._ray_util import init_ray, worker_runtime_env
from t2v_core.matrix import cells, experiment
from t2v_core.matrix.experiment import FillResult, MatrixRun
from t2v_core.matrix.finetune import HeadConfig
from t2v_core.matrix.rows import written
from t2v_core.storage import StorageRoot, redact_uri

log = logging.getLogger("jobs.fill_matrix")

# Tune's classic, quiet console output (its status table only with -v), and only the JSON
# result logger (added explicitly) instead of JSON + CSV + TensorBoard per trial.
_TUNE_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


class UsageError(ValueError):
    """The job was asked for something it cannot do: an invalid setting, or a selection
    that matches nothing."""


# -- configuration --------------------------------------------------------------------------
def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


SEARCH, RECIPE, EXECUTION = "search", "recipe", "execution"


@dataclass(frozen=True, kw_only=True)
class Config:
    """The job's settings, one field per flag; "auto" or None take the mode's own."""

    root: str = root_option()
    tracking_uri: str | None = tracking_uri_option("only inside a pipeline run")
    tracking: bool = opt(True, help="do not log to MLflow")
    mode: str = opt("probe", choices=["probe", "finetune"], help="probe: head on frozen cached "
                    "features; finetune: whole network")
    tasks: str | None = opt(None, help="comma-separated task ids or glob patterns")
    experts: str | None = opt(None, help="comma-separated expert ids or glob patterns")
    shard: tuple[int, int] | None = shard_option("fill only the cells whose key hash falls in "
                                                 "shard i of n")
    max_cells: int | None = opt(None, help="fill at most this many missing cells in this run")
    retry_failed: bool = opt(False, help="re-train cells recorded as failed")
    num_samples: int = opt(4, group=SEARCH, help="configurations per cell")
    lr: tuple[float, float] | None = opt(None, group=SEARCH, type=_range, help="learning-rate "
                                         "range LOW,HIGH (default 1e-3,1e-1)")
    weight_decay: tuple[float, float] = opt((1e-6, 1e-2), group=SEARCH, type=_range,
                                            help="range LOW,HIGH")
    layout: str = opt("auto", group=SEARCH, choices=["auto", *cells.LAYOUTS], help="batched: "
                      "many cells and configs per trial; trial: one (cell, config) per trial; "
                      "auto: batched for probe, trial for finetune")
    cells_per_trial: int = opt(32, group=SEARCH, help="cells per batched trial")
    seed: int = opt(0, group=SEARCH)
    epochs: int | None = opt(None, group=RECIPE, help="probe: full-batch Adam steps (300); "
                             "finetune: epochs (10)")
    hidden: int = opt(0, group=RECIPE, help="probe head hidden width (0: linear)")
    batch_size: int = opt(32, group=RECIPE, help="finetune batch size")
    image_size: int | None = opt(None, group=RECIPE, help="input size in pixels (default: the "
                                 "expert architecture's)")
    max_per_class: int | None = opt(None, group=RECIPE, help="cap on training images per class; "
                                    "capped cells are kept apart from the full-data ones "
                                    "(default: all images)")
    max_test_per_class: int | None = opt(None, group=RECIPE, help="cap on test images/class")
    val_fraction: float = opt(0.2, group=RECIPE, help="share of each class's training images "
                              "used to pick the configuration")
    address: str | None = opt(None, group=EXECUTION, help="Ray address to connect to ('auto', "
                              "host:port); default: $RAY_ADDRESS, else a new local Ray")
    num_cpus: int | None = opt(None, group=EXECUTION, help="CPUs of a local Ray")
    cpus_per_trial: float = opt(1.0, group=EXECUTION)
    gpus_per_trial: float = opt(0.0, group=EXECUTION)
    max_concurrent_trials: int | None = opt(None, group=EXECUTION)
    max_failures: int = opt(1, group=EXECUTION, help="retries of a crashed trial")
    name: str | None = opt(None, group=EXECUTION, help="Tune experiment name (default: from the "
                           "plan)")
    summary_json: str | None = opt(None, group=EXECUTION, help="also write the run summary here")
    no_progress: bool = opt(False, group=EXECUTION, help="no progress bar")
    verbose: bool = opt(False, group=EXECUTION, flag=("-v", "--verbose"), help="debug logs and "
                        "Tune's status table")

    def __post_init__(self) -> None:
        checks = [
            (self.mode in ("probe", "finetune"), f"--mode: probe or finetune, not {self.mode!r}"),
            (self.layout in ("auto", *cells.LAYOUTS),
             f"--layout: auto, batched or trial, not {self.layout!r}"),
            (self.num_samples >= 1 and self.cells_per_trial >= 1,
             "--num-samples and --cells-per-trial must be at least 1"),
            (self.max_per_class is None or self.max_per_class >= 1,
             "--max-per-class must be at least 1"),
            (self.shard is None or 0 <= self.shard[0] < self.shard[1],
             f"--shard i/n needs 0 <= i < n, got {self.shard}"),
        ]
        checks += [(value is None or 0 < value[0] <= value[1],
                    f"--{name}: expected LOW,HIGH with 0 < LOW <= HIGH, got {value}")
                   for name, value in (("lr", self.lr), ("weight-decay", self.weight_decay))]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def fill_config(self) -> cells.FillConfig:
        """What every cell of this run is trained with."""
        names = ("layout", "epochs", "hidden", "batch_size", "seed", "lr", "weight_decay",
                 "num_samples", "image_size", "max_per_class", "max_test_per_class",
                 "val_fraction")
        return cells.FillConfig.for_mode(self.root, self.mode,
                                         **{name: getattr(self, name) for name in names})


# -- the Tune trial (a worker) and the row writer (the driver) -------------------------------
def run_trial(trial: dict) -> None:
    """The Tune trainable: one unit of cells; reports the cells' outcomes as JSON."""
    fill = cells.FillConfig.from_dict(trial["fill"])
    unit = cells.CellUnit.from_dict(trial["unit"])
    torch.set_num_threads(trial["threads"])
    if written(fill.storage(), unit.tasks, unit.expert, fill.mode, fill.max_per_class):
        # A restored experiment whose state predates this trial's completion (the driver
        # was killed): the rows are in the matrix, nothing to recompute.
        tune.report(dict(experiment.SKIPPED_REPORT))
        return
    on_epoch = _report_epoch if fill.mode == "finetune" else None
    configs = [HeadConfig(**c) for c in trial["configs"]]
    tune.report(experiment.unit_report(cells.train_unit(fill, unit, configs, on_epoch)))


def _report_epoch(metrics: dict) -> None:
    tune.report({k: v for k, v in metrics.items() if v is not None})


class MatrixWriter(experiment.GridWriter, tune.Callback):
    """The grid's rows and progress bar (:class:`~t2v_core.matrix.experiment.GridWriter`) as
    Tune's callback, pickled with the experiment's state."""

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._restored_seen = False

    def setup(self, **info) -> None:
        self.start()

    def on_step_begin(self, iteration: int, trials: list[Trial], **info) -> None:
        if not self._restored_seen:  # trials finished before an interruption count too
            self._restored_seen = True
            for trial in trials:
                if trial.status == Trial.TERMINATED:
                    self.on_trial_complete(iteration, trials, trial)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self.report(trial.config["unit"], trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        log.warning("trial %s failed; its cells stay missing and are retried on the next run",
                    trial.trial_id)

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self.close()


# -- Tune -----------------------------------------------------------------------------------
def tune_storage(root: StorageRoot) -> tuple[str, PyFileSystem | None]:
    """Tune's ``storage_path`` and ``storage_filesystem`` for the storage root: a local
    directory, or an fsspec filesystem wrapped for pyarrow with a ``bucket/prefix`` path."""
    if root.local:
        return root.join("tune"), None
    return f"{root.path}/tune", PyFileSystem(FSSpecHandler(root.fs))


def _trial_name(trial: Trial) -> str:
    return f"unit_{trial.trial_id}"


class _UnreadTrialFiles(logging.Filter):
    """Tune warns "Failed to fetch metrics" for the trials of an interrupted run that left no
    result files; this job reads the reported results, never those files."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to fetch metrics")


@contextlib.contextmanager
def _tune_console() -> Iterator[None]:
    """:data:`_TUNE_ENV` and the filter above for the block, the environment restored after."""
    # MLflow, imported with the helper, is heavy; Tune's workers import this module.
    from t2v_core.review.tracking import environment_kept

    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    quiet = _UnreadTrialFiles()
    with environment_kept(*_TUNE_ENV):
        for name, value in _TUNE_ENV.items():
            os.environ.setdefault(name, value)
        analysis.addFilter(quiet)
        try:
            yield
        finally:
            analysis.removeFilter(quiet)


class _TuneRunner:
    """The experiments of one run as Tune experiments under ``<root>/tune``."""

    def __init__(self, config: Config, job: MatrixRun):
        self.config, self.job = config, job
        self.storage_path, self.fs = tune_storage(job.fill.storage())

    def can_restore(self, name: str) -> bool:
        return tune.Tuner.can_restore(f"{self.storage_path}/{name}", storage_filesystem=self.fs)

    def run(self, name: str, grid: cells.TrialGrid | None) -> tuple[list, int]:
        results = self._tuner(name, grid).fit()
        # Tune creates trials lazily, so an interrupted grid simply has fewer trials.
        return ([(r.error, r.metrics) for r in results],
                results.num_terminated + results.num_errors)

    def _tuner(self, name: str, grid: cells.TrialGrid | None) -> tune.Tuner:
        """A new experiment over ``grid``, or (None) the stored experiment ``name`` restored."""
        c, fill = self.config, self.job.fill
        trainable = tune.with_resources(run_trial, {"cpu": c.cpus_per_trial,
                                                    "gpu": c.gpus_per_trial})
        if grid is None:
            log.info("resuming the interrupted Tune experiment %s", name)
            return tune.Tuner.restore(f"{self.storage_path}/{name}", trainable=trainable,
                                      resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=self.fs)
        writer = MatrixWriter(fill, grid, progress=not c.no_progress, retry_failed=c.retry_failed)
        return tune.Tuner(
            trainable,
            # Plain values only: Tune restores an experiment's objects of other types as
            # placeholders that resolve in the process that created them, not in a later one.
            param_space={"unit": tune.grid_search([u.to_dict() for u in grid.units]),
                         "configs": tune.grid_search([[h.to_dict() for h in hps]
                                                      for hps in grid.config_lists]),
                         "fill": fill.to_dict(), "threads": max(1, int(c.cpus_per_trial))},
            tune_config=tune.TuneConfig(
                num_samples=1, max_concurrent_trials=c.max_concurrent_trials, reuse_actors=True,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=name, storage_path=self.storage_path, storage_filesystem=self.fs,
                failure_config=tune.FailureConfig(max_failures=c.max_failures),
                callbacks=[writer, JsonLoggerCallback()], verbose=1 if c.verbose else 0),
        )


def run(config: Config) -> FillResult:
    """Plan, run (or resume) and record the missing cells of the selection. Raises
    :class:`UsageError` for a selection that matches nothing."""
    started, settings = time.time(), config.fill_config()
    try:
        job = MatrixRun.select(settings, config.tasks, config.experts, shard=config.shard,
                               name=config.name, threads=max(1, int(config.cpus_per_trial)),
                               cells_per_trial=config.cells_per_trial)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    counts = experiment.TrialCounts()
    with _tune_console(), logging_redirect_tqdm():
        already_done, planned = experiment.fill(
            job, _TuneRunner(config, job), counts, retry_failed=config.retry_failed,
            max_cells=config.max_cells, cells_per_trial=config.cells_per_trial,
            before_run=lambda: init_ray(config.address, local_cpus=config.num_cpus,
                                        runtime_env=worker_runtime_env()))
    rows = job.tally()
    for task_id, expert_id, error in rows.failures:
        log.warning("cell %s × %s failed: %s", task_id, expert_id, error)
    result = FillResult(
        root=redact_uri(settings.root), mode=settings.mode, layout=settings.layout,
        max_per_class=config.max_per_class, experiment=job.base, tasks=len(job.tasks),
        experts=len(job.experts), requested=len(job.requested), already_done=already_done,
        planned=planned, cells_ok=rows.ok, cells_failed=rows.failed,
        cells_missing=rows.missing, mean_test_error=rows.mean_test_error,
        seconds=round(time.time() - started, 2), **counts.as_dict())
    log.info("%s", result.summary())
    if config.summary_json:
        Path(config.summary_json).write_text(json.dumps(asdict(result), indent=2))
    record_stage(config, "fill_matrix",
                 {"mode": result.mode, "num_samples": config.num_samples,
                  "max_per_class": config.max_per_class},
                 {k: getattr(result, k) for k in ("cells_ok", "cells_failed", "cells_missing",
                                                  "trials_run", "feature_hits", "feature_misses")})
    return result


# -- command line ---------------------------------------------------------------------------
parse_args = config_reader(Config)


def _exit_status(config: Config, result: FillResult) -> int:
    """0: every requested cell has a row (or --max-cells left the rest); 1: trials errored or
    cells are missing; 130: interrupted (re-run to resume); 2 (main): bad usage."""
    if result.interrupted:
        return 130
    incomplete = result.cells_missing and config.max_cells is None
    return 1 if result.trials_errored or incomplete else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={UsageError: 2}, report=_exit_status)


if __name__ == "__main__":
    # Run as the importable module so that Tune pickles the trainable by reference.
    from jobs.fill_matrix import main as _main

    sys.exit(_main())
