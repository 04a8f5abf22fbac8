"""The experts a zoo is given: which source tasks get one, which of their experts are missing or
stale, and the files of each (``experts/<expert_id>.pt`` and its source head beside it).

An expert's content hash covers the architecture, the base weights, its source task's content
hash and the recipe (:func:`~t2v_core.matrix.experts.expert_content_hash`), so an expert
registered with the same hash whose files exist is done, and planning again skips it
(:func:`plan_expert_run`). :class:`TrainReport` records what a run made, registering each
expert in the manifest as it arrives.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import torch

from t2v_core.embedding.probes import Probe, build_probe, resolve_weights
from t2v_core.matrix.experts import (
    HEAD_SUFFIX,
    Recipe,
    SourceHead,
    base_head,
    expert_content_hash,
    finetune,
    state_digest,
)
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import load_split
from t2v_core.zoo.demo_world import representative_tasks
from t2v_core.zoo.manifest import (
    ExpertSpec,
    TaskSpec,
    read_experts,
    read_tasks,
    select_specs,
    upsert_experts,
)

log = logging.getLogger(__name__)

EXPERTS_DIR = "experts"
GENERIC = "generic"


@dataclass(frozen=True)
class ExpertJob:
    """One expert to make; ``task`` is None for the generic expert (the base weights)."""

    expert_id: str
    task: TaskSpec | None
    content_hash: str

    def spec(self, arch: str, weights_uri: str) -> ExpertSpec:
        """The expert's manifest entry once its files are written."""
        return ExpertSpec(self.expert_id, arch, weights_uri,
                          None if self.task is None else self.task.task_id, self.content_hash)


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


def weights_rel(expert_id: str) -> str:
    return f"{EXPERTS_DIR}/{expert_id}.pt"


def head_rel(expert_id: str) -> str:
    """The source head's file; :func:`t2v_core.matrix.experts.head_uri` finds it from the
    weights URI."""
    return f"{EXPERTS_DIR}/{expert_id}{HEAD_SUFFIX}"


def write_expert(root: StorageRoot, expert_id: str, backbone: torch.nn.Module,
                 head: SourceHead | None) -> str:
    """Weights first, then the head: an expert counts as done only once both exist. Returns
    the weights' URI."""
    buf = io.BytesIO()
    torch.save(backbone.state_dict(), buf)
    uri = root.write_bytes_atomic(weights_rel(expert_id), buf.getvalue())
    if head is not None:
        root.write_bytes_atomic(head_rel(expert_id), head.to_bytes())
    return uri


def train_expert(root_uri: str, arch: str, weights: str | None, task: TaskSpec, recipe: Recipe,
                 expert_id: str) -> dict:
    """Fine-tune one expert on its source task and write its weights and source head."""
    probe = build_probe(arch, weights, seed=recipe.seed, input_size=recipe.image_size)
    images, labels = load_split(task, "train", recipe.image_size, recipe.max_per_class,
                                seed=recipe.seed)
    result = finetune(probe, images, labels, task.n_classes, recipe, name=expert_id)
    head = SourceHead.from_linear(result.head, task.classes)
    uri = write_expert(StorageRoot(root_uri), expert_id, result.backbone, head)
    return {"expert_id": expert_id, "weights_uri": uri, "digest": state_digest(result.backbone),
            "train_error": result.train_error, "seconds": result.seconds}


def plan_experts(root: StorageRoot, arch: str, base_digest: str, tasks: list[TaskSpec],
                 recipe: Recipe, prefix: str, generic: bool, generic_head: bool = False
                 ) -> tuple[list[ExpertJob], list[ExpertJob]]:
    """(experts to make, experts already done) of ``prefix__<task_id>`` for the tasks, and
    ``prefix__generic`` with ``generic``. Every trained expert has a source head; the generic
    one has one when ``generic_head`` (its base checkpoint has one)."""
    jobs = [ExpertJob(f"{prefix}__{GENERIC}", None,
                      expert_content_hash(arch, base_digest, None, None))] if generic else []
    jobs += [ExpertJob(f"{prefix}__{t.task_id}", t,
                       expert_content_hash(arch, base_digest, t.content_hash, recipe))
             for t in tasks]
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


@dataclass(frozen=True)
class ExpertPlan:
    """The base the experts are made from, the generic expert's source head (None: the base
    checkpoint has no classifier, or no generic expert) and the experts to make and done."""

    base: Probe
    weights_uri: str | None
    generic_head: SourceHead | None
    todo: list[ExpertJob]
    done: list[ExpertJob]

    def write_generic(self, root: StorageRoot, arch: str) -> list[str]:
        """Write and register the generic expert if it is to do: the base weights themselves,
        with the base checkpoint's classifier as its head. Returns its id (or none)."""
        written = []
        for job in (j for j in self.todo if j.task is None):
            uri = write_expert(root, job.expert_id, self.base.backbone, self.generic_head)
            upsert_experts(root, [job.spec(arch, uri)])
            written.append(job.expert_id)
            log.info("generic expert %s = the base weights (%s), %s", job.expert_id,
                     self.base.probe_id, "no source head (the base weights have no classifier)"
                     if self.generic_head is None
                     else f"source head with {self.generic_head.n_classes} classes")
        return written


@dataclass
class TrainReport:
    """Expert ids by outcome, and the training error of each expert trained now."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    train_error: dict[str, float] = field(default_factory=dict)
    base_probe_id: str = ""

    def add(self, root: StorageRoot, arch: str, job: ExpertJob, result: dict | None,
            error: BaseException | None) -> None:
        """Register an expert :func:`train_expert` made (its ``result``), or count it failed:
        one failed expert must not lose the others."""
        if error is not None:
            log.error("expert %s failed: %s: %s", job.expert_id, type(error).__name__, error)
            self.failed.append(job.expert_id)
            return
        upsert_experts(root, [job.spec(arch, result["weights_uri"])])
        self.trained.append(job.expert_id)
        self.train_error[job.expert_id] = result["train_error"]
        log.info("expert %s: train error %.3f in %.1fs", job.expert_id, result["train_error"],
                 result["seconds"])


def plan_expert_run(root: StorageRoot, arch: str, weights: str | None, tasks: str,
                    recipe: Recipe, *, prefix: str | None = None, generic: bool = True,
                    base: Probe | None = None) -> ExpertPlan:
    """:func:`plan_experts` for the registered tasks ``tasks`` selects (:func:`select_tasks`)
    on ``weights`` (resolved as :func:`~t2v_core.embedding.probes.resolve_weights` does);
    ``base`` is that probe when the caller has built it already."""
    weights_uri = resolve_weights(arch, weights)
    if base is None:
        base = build_probe(arch, weights_uri, seed=recipe.seed, input_size=recipe.image_size)
    head = base_head(weights_uri, base.feature_dim) if generic else None
    todo, done = plan_experts(root, arch, state_digest(base.backbone),
                              select_tasks(read_tasks(root), tasks), recipe, prefix or arch,
                              generic, head is not None)
    return ExpertPlan(base, weights_uri, head, todo, done)
