"""A matrix run's bookkeeping without Ray: what :func:`experiment.fill` does with a runner that
finishes its trials, one that is interrupted, and one that restores the interrupted experiment;
how trial reports are counted; how a run's settings follow from its mode."""

import json
import time

from t2v_core.matrix import experiment
from t2v_core.matrix.cells import CellOutcome, FillConfig, UnitResult
from t2v_core.matrix.experiment import MatrixRun, TrialCounts
from t2v_core.matrix.finetune import FinetuneRecipe, ProbeRecipe, SearchSpace, TrainResult
from t2v_core.matrix.rows import missing_cells, read_matrix
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec


def _outcome(task: str, expert: str) -> CellOutcome:
    result = TrainResult("ok", 0.3, 0.05, 0.2, 0.1, 0.2, 7, 1.5, 40, 10, {"lr": 0.01}, None, 24)
    return CellOutcome(task, expert, "t", "e", result, {"lr": 0.01}, 2, 0, 1.5, "cpu", "p")


class FakeRunner:
    """Runs the first ``finish`` units of a new experiment (all when None); a restored one
    reports nothing new and ``finish`` trials finished."""

    def __init__(self, finish: int | None = None, restorable: tuple[str, ...] = ()):
        self.finish, self.restorable, self.calls = finish, set(restorable), []

    def can_restore(self, name: str) -> bool:
        return name in self.restorable

    def run(self, name, grid):
        self.calls.append((name, grid is None))
        if grid is None:
            return [], self.finish
        units = grid.units if self.finish is None else grid.units[: self.finish]
        reports = [experiment.unit_report(UnitResult(
            [_outcome(t.task_id, u.expert.expert_id) for t in u.tasks], 1, 0, 0.1, "cpu"))
            for u in units]
        return [(None, {**r, "timestamp": time.time()}) for r in reports], len(units)


def _job(tmp_path) -> MatrixRun:
    tasks = [TaskSpec(t, "f", "/x", "imagefolder", ("a", "b"), 4, 2, "t") for t in ("t1", "t2")]
    experts = [ExpertSpec(e, "small_cnn", "/w", None, "e") for e in ("e1", "e2")]
    fill = FillConfig(root=str(tmp_path), num_samples=1)
    return MatrixRun(fill, tasks, experts, missing_cells(tasks, experts, set()), "matrix-test")


def test_a_finished_experiment_writes_every_cell_and_is_not_resumed(tmp_path):
    job = _job(tmp_path)
    counts = TrialCounts()
    assert experiment.fill(job, FakeRunner(), counts, cells_per_trial=1) == (0, 4)
    assert (counts.trials_run, counts.feature_hits, counts.interrupted) == (4, 4, False)
    assert json.loads(job.fill.storage().read_bytes(job.pointer))["state"] == "done"
    assert job.unfinished() is None and read_matrix(job.fill.storage()).num_rows == 4
    again = FakeRunner()
    assert experiment.fill(job, again, TrialCounts(), cells_per_trial=1) == (4, 0)
    assert again.calls == []


def test_an_interrupted_experiment_is_restored_then_the_rest_is_planned(tmp_path):
    job = _job(tmp_path)
    counts = TrialCounts()
    experiment.fill(job, FakeRunner(finish=1), counts, cells_per_trial=1)
    state = job.unfinished()
    assert counts.interrupted and state["trials"] == 4
    assert read_matrix(job.fill.storage()).num_rows == 1  # the finished trial's cell

    started = []
    runner = FakeRunner(finish=4, restorable=(state["name"],))
    counts = TrialCounts()
    done, planned = experiment.fill(job, runner, counts, cells_per_trial=1,
                                    before_run=lambda: started.append(True))
    assert counts.resumed and runner.calls[0] == (state["name"], True)
    assert (done, planned) == (1, 3) and len(runner.calls) == 2 and len(started) == 2
    assert job.unfinished() is None and read_matrix(job.fill.storage()).num_rows == 4


def test_an_experiment_that_cannot_be_restored_is_planned_afresh(tmp_path):
    job = _job(tmp_path)
    experiment.fill(job, FakeRunner(finish=2), TrialCounts(), cells_per_trial=1)
    counts = TrialCounts()
    assert experiment.fill(job, FakeRunner(), counts, cells_per_trial=1) == (2, 2)
    assert not counts.resumed and read_matrix(job.fill.storage()).num_rows == 4


def test_counts_take_only_the_trials_of_this_run_and_skip_written_units():
    counts = TrialCounts()
    ran = experiment.unit_report(UnitResult([_outcome("t1", "e1")], 2, 3, 0.1, "cpu"))
    trials = [(None, {**ran, "timestamp": 100}), (None, {**ran, "timestamp": 50}),
              (None, {**experiment.SKIPPED_REPORT, "timestamp": 100}),
              (RuntimeError("worker died\nlast line"), None), (None, {"done": False})]
    outcomes = counts.add(trials, since=100)
    assert [o.key for o in outcomes] == [("t1", "e1"), ("t1", "e1")]  # the older one too
    assert (counts.trials_run, counts.trials_skipped, counts.trials_errored) == (1, 1, 1)
    assert (counts.feature_hits, counts.feature_misses) == (2, 3)


def test_settings_follow_the_mode():
    probe = FillConfig.for_mode("/r", "probe", epochs=50, lr=(0.01, 0.02), num_samples=2)
    assert probe.layout == "batched" and probe.recipe == ProbeRecipe(epochs=50)
    assert probe.search.lr == (0.01, 0.02) and probe.num_samples == 2
    tuned = FillConfig.for_mode("/r", "finetune", seed=3, max_per_class=5)
    assert tuned.layout == "trial" and tuned.recipe == FinetuneRecipe(seed=3)
    assert tuned.search.lr == SearchSpace.lr and (tuned.seed, tuned.max_per_class) == (3, 5)
