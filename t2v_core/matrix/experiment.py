"""One run over the matrix: the cells it asks for and the name of its experiment, the pointer
that lets a re-run resume an unfinished experiment, and what the trials reported.

:func:`fill` resumes the experiment an earlier run left unfinished, then plans and runs the
cells still missing; an :class:`ExperimentRunner` (the job's Ray Tune) runs the trials. A unit
of work reports its outcomes as one flat dict of plain values (:func:`unit_report`), the form
such a runner stores and hands back; the driver reads them again (:func:`reported_outcomes`)
to write rows and to count the work (:class:`TrialCounts`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Protocol

from tqdm import tqdm

from t2v_core.matrix.cells import (
    Cell,
    CellKey,
    CellOutcome,
    CellTally,
    CellUnit,
    CellWriter,
    FillConfig,
    TrialGrid,
    UnitResult,
    cells_with_rows,
    plan_cells,
    plan_trials,
    tally,
    write_missing_rows,
)
from t2v_core.matrix.rows import missing_cells
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec, read_experts, read_tasks, select_specs

log = logging.getLogger(__name__)

ACTIVE_DIR = "tune/_active"
# What a unit reports when its rows were in the matrix already.
SKIPPED_REPORT = {"cells_json": "[]", "n_cells": 0, "skipped": 1, "done": True}


def digest(obj: object) -> str:
    """A short digest of JSON-ready values: a name that changes when they do."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def unit_report(out: UnitResult) -> dict:
    """A unit's outcomes and costs as plain values."""
    ok = [o.result for o in out.outcomes if o.result.ok]
    return {
        "cells_json": json.dumps([o.to_dict() for o in out.outcomes]),
        "n_cells": len(out.outcomes),
        "n_failed": len(out.outcomes) - len(ok),
        "best_val_error": min((r.val_error for r in ok if r.val_error is not None),
                              default=float("nan")),
        "feature_hits": out.feature_hits,
        "feature_misses": out.feature_misses,
        "unit_seconds": out.seconds,
        "done": True,
    }


def reported_outcomes(report: dict) -> list[CellOutcome]:
    return [CellOutcome.from_dict(d) for d in json.loads(report.get("cells_json") or "[]")]


class GridWriter:
    """Writes each cell's row of an experiment's grid as soon as all of its units have
    reported (in the driver), and drives a progress bar over the grid's cells, those written
    before counting as done. Pickles without its bar and its writer's state, which
    :meth:`start` rebuilds: the writer of a restored experiment."""

    def __init__(self, fill: FillConfig, grid: TrialGrid, progress: bool = True,
                 retry_failed: bool = False):
        self.fill, self.grid = fill, grid
        self.progress, self.retry_failed = progress, retry_failed
        self.__setstate__(self.__getstate__())

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("fill", "grid", "progress", "retry_failed")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.bar: tqdm | None = None
        self.rows = CellWriter(self.fill, self.grid.expected)

    def start(self) -> None:
        done = cells_with_rows(self.fill, self.grid, retry_failed=self.retry_failed)
        if done:
            log.info("%d of this experiment's %d cells are written already", len(done),
                     len(self.grid.expected))
        if self.progress:
            self.bar = tqdm(total=len(self.grid.expected), initial=len(done),
                            desc="matrix cells", unit="cell")
        self.rows = CellWriter(self.fill, self.grid.expected, done,
                               self.bar.update if self.bar is not None else None)

    def report(self, unit: dict, report: dict) -> None:
        """A unit's last report: its outcomes, or (skipped) its rows were written before."""
        if report.get("skipped"):
            self.rows.mark(CellUnit.from_dict(unit).keys())
        else:
            self.rows.add(reported_outcomes(report))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class TrialCounts:
    """What the experiments of one run did so far."""

    trials_run: int = 0
    trials_errored: int = 0
    trials_skipped: int = 0
    feature_hits: int = 0
    feature_misses: int = 0
    attempted: set[CellKey] = field(default_factory=set)
    resumed: bool = False
    interrupted: bool = False

    def add(self, trials: Iterable[tuple[BaseException | None, dict | None]], since: float
            ) -> list[CellOutcome]:
        """Count the trials, as (error, last report), that ran since ``since``; returns every
        trial's outcomes."""
        outcomes = []
        for error, report in trials:
            if error is not None:
                self.trials_errored += 1
                log.warning("trial failed: %s", str(error).splitlines()[-1][:300])
                continue
            m = report or {}
            if "cells_json" not in m:
                continue
            outcomes.extend(reported_outcomes(m))
            if m.get("timestamp", 0) < since:
                continue
            if m.get("skipped"):
                self.trials_skipped += 1
                continue
            self.trials_run += 1
            self.feature_hits += int(m.get("feature_hits", 0))
            self.feature_misses += int(m.get("feature_misses", 0))
        return outcomes

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attempted"}


@dataclass(frozen=True)
class MatrixRun:
    """One run's fixed inputs: what its cells are trained with, the selected zoo, the cells
    asked for and ``base``, the stem of its experiments' names."""

    fill: FillConfig
    tasks: list[TaskSpec]
    experts: list[ExpertSpec]
    requested: list[Cell]
    base: str

    @classmethod
    def select(cls, fill: FillConfig, tasks: str | None = None, experts: str | None = None, *,
               shard: tuple[int, int] | None = None, name: str | None = None,
               threads: int = 1, cells_per_trial: int = 32) -> MatrixRun:
        """The cells of the tasks × experts that the patterns select (in shard i of n). The
        base is ``name``, else a digest of the cells and settings, so that a re-run of the same
        selection finds its experiment. Raises ValueError when a pattern matches nothing."""
        root = fill.storage()
        task_specs = select_specs(read_tasks(root), tasks, what="task")
        expert_specs = select_specs(read_experts(root), experts, what="expert")
        requested = missing_cells(task_specs, expert_specs, set(), shard=shard)
        base = name or "matrix-{}-{}".format(fill.mode, digest({
            "cells": sorted((t.task_id, t.content_hash, e.expert_id, e.content_hash)
                            for t, e in requested),
            "fill": fill.record(), "threads": threads, "per_trial": cells_per_trial}))
        return cls(fill, task_specs, expert_specs, requested, base)

    @property
    def pointer(self) -> str:
        return f"{ACTIVE_DIR}/{self.base}.json"

    def experiment_name(self, grid: TrialGrid) -> str:
        return f"{self.base}-{digest(sorted(grid.expected))}"

    def point_at(self, name: str, running_trials: int | None = None) -> None:
        """Record experiment ``name`` as running ``running_trials`` trials, or (None) done."""
        state = ({"name": name, "state": "running", "trials": running_trials}
                 if running_trials is not None else {"name": name, "state": "done"})
        self.fill.storage().write_bytes_atomic(self.pointer, json.dumps(state).encode())

    def unfinished(self) -> dict | None:
        """The pointer's state (``name``, ``trials``) when it names a running experiment."""
        root = self.fill.storage()
        if not root.exists(self.pointer):
            return None
        state = json.loads(root.read_bytes(self.pointer))
        return state if state.get("state") == "running" else None

    def settle(self, counts: TrialCounts, outcomes: list[CellOutcome], planned: set[CellKey]
               ) -> None:
        """Count ``planned`` as attempted and write the rows of those cells whose outcomes
        reached no writer (a writer restored after an error, a cell trained in two runs)."""
        counts.attempted |= planned
        write_missing_rows(self.fill, outcomes, planned, self.tasks, self.experts)

    def tally(self) -> CellTally:
        return tally(self.fill, self.tasks, self.experts, self.requested)


Trials = list[tuple[BaseException | None, dict | None]]  # (error, last report) per trial


class ExperimentRunner(Protocol):
    """Runs the trials of one experiment; a restored one resumes the unfinished trials."""

    def can_restore(self, name: str) -> bool: ...

    def run(self, name: str, grid: TrialGrid | None) -> tuple[Trials, int]:
        """Run experiment ``name`` over ``grid``, or (None) restore it; returns every trial's
        (error, last report) and how many trials finished (completed or errored)."""
        ...


def fill(job: MatrixRun, runner: ExperimentRunner, counts: TrialCounts, *,
         retry_failed: bool = False, max_cells: int | None = None, cells_per_trial: int = 32,
         before_run: Callable[[], object] = lambda: None) -> tuple[int, int]:
    """Finish the experiment an earlier run left unfinished, then, unless that was interrupted
    again, plan and run the cells still missing; returns (already done, planned now).
    ``before_run`` is called before any trial runs (e.g. to start the runner's cluster)."""
    _resume(job, runner, counts, before_run)
    if counts.interrupted:
        return 0, 0
    plan = plan_cells(job.fill, job.requested, retry_failed=retry_failed, skip=counts.attempted,
                      max_cells=max_cells)
    log.info("%d tasks × %d experts (%s per class): %d cells requested, %d done, %d to fill now "
             "(%s layout)", len(job.tasks), len(job.experts),
             job.fill.max_per_class or "all images", len(plan.requested), plan.already_done,
             len(plan.todo), job.fill.layout)
    if plan.todo:
        before_run()
        grid = plan_trials(plan.todo, job.fill, cells_per_trial)
        name = job.experiment_name(grid)
        log.info("experiment %s: %d trials", name, grid.n_trials)
        _execute(job, runner, counts, name, grid, grid.n_trials)
    return plan.already_done, len(plan.todo)


def _resume(job: MatrixRun, runner: ExperimentRunner, counts: TrialCounts,
            before_run: Callable[[], object]) -> None:
    state = job.unfinished()
    if not state or not runner.can_restore(state["name"]):
        return
    before_run()
    counts.resumed = True
    try:
        _execute(job, runner, counts, state["name"], None, state["trials"])
    except Exception as exc:  # unreadable state: the matrix itself says what is left
        log.warning("cannot resume %s (%s: %s); planning the missing cells afresh",
                    state["name"], type(exc).__name__, exc)
        counts.resumed = False


def _execute(job: MatrixRun, runner: ExperimentRunner, counts: TrialCounts, name: str,
             grid: TrialGrid | None, n_trials: int) -> None:
    """Run (or restore) one experiment and write the rows its trials left unwritten; an
    interrupted one keeps the pointer, for the next run to resume it."""
    job.point_at(name, n_trials)
    since = int(time.time())
    trials, finished = runner.run(name, grid)
    outcomes = counts.add(trials, since)
    job.settle(counts, outcomes, set(grid.expected) if grid else {o.key for o in outcomes})
    # A runner that creates trials lazily leaves an interrupted grid with fewer trials.
    if finished < n_trials:
        log.warning("run interrupted; re-run the same command to resume %s", name)
        counts.interrupted = True
    else:
        job.point_at(name)


@dataclass(frozen=True)
class FillResult:
    """What a run did: the selection, the trials run here and their feature-cache use, and
    the requested cells' rows afterwards."""

    root: str
    mode: str
    layout: str
    max_per_class: int | None
    experiment: str
    tasks: int
    experts: int
    requested: int
    resumed: bool = False
    interrupted: bool = False
    already_done: int = 0
    planned: int = 0
    trials_run: int = 0
    trials_errored: int = 0
    trials_skipped: int = 0
    feature_hits: int = 0
    feature_misses: int = 0
    cells_ok: int = 0
    cells_failed: int = 0
    cells_missing: int = 0
    mean_test_error: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"matrix {self.root} ({self.mode}): {self.cells_ok}/{self.requested} cells ok, "
            f"{self.cells_failed} failed, {self.cells_missing} missing; {self.trials_run} "
            f"trials run here ({self.trials_errored} errored, {self.trials_skipped} skipped as "
            f"already written), features {self.feature_hits} cached / {self.feature_misses} "
            f"computed, {self.seconds:.1f}s" + (", resumed an interrupted run" if self.resumed
                                                 else ""))
