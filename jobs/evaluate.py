"""Evaluate expert selectors on the zoo, in the form of the paper's Table 1.

    python -m jobs.evaluate --root ./t2v-data [--folds loo|K [--repeats N]]
        [--probe-id P --method M]

Every task is held out in turn (leave-one-task-out, or K folds over tasks, with --repeats N
averaged over N fold assignments); learned selectors are fitted on the other tasks only.
Beside the selectors, two reference rows: the oracle, and "Family best", which is told each
task's family and picks the expert best on that family's training tasks (what knowing the
family alone is worth). The table scores the novel tasks (no expert's source) first, then all
tasks. The protocol is :func:`t2v_core.recommend.table1.evaluate_table1`. With --image-size,
the per-expert scores (LogME, LEEP, ridge LOO, NCE) and the default recommender (MODEL2VEC's
shortlist of 1, 3 or 5 experts re-ranked by their scores) join, and every row states its cost in expert
forward passes per task. Writes ``evaluation/<run>/table1.md``, ``table1.json`` and
``cost_vs_quality.png`` under the storage root (``evaluation/LATEST`` names the newest run),
prints the table next to the paper's numbers, and logs metrics and plots to MLflow.

Exit status: 0 done; 1 nothing to evaluate (no embeddings or matrix, bad --folds); 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from jobs._cli import (
    MetaDatasetOptions,
    opt,
    parse_config,
    repeats_option,
    repeats_problem,
    run_main,
)
from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.recommend.protocol import EvaluationResult
from t2v_core.recommend.table1 import Table1Report, evaluate_table1, transfer_context
from t2v_core.review.table1_review import cost_figure, track_table1, write_table1
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks

log = logging.getLogger("jobs.evaluate")


class FoldsError(argparse.ArgumentTypeError, ValueError):
    """A --folds that is neither 'loo' nor a number: a usage error on the command line, a
    ValueError from :func:`run`."""


def _folds(folds: str | int) -> str | int:
    """'loo', or the number of folds as an int."""
    if folds == "loo":
        return folds
    try:
        return int(folds)
    except (TypeError, ValueError):
        raise FoldsError(f"folds must be 'loo' or a number of folds, got {folds!r}") from None


TRANSFER = ("LogME, LEEP, ridge LOO and NCE baselines (from the matrix job's cached expert "
            "features and the experts' source heads)")


@dataclass(frozen=True, kw_only=True)
class Config(MetaDatasetOptions):
    """The job's options, one field per flag, with those of :class:`MetaDatasetOptions`."""

    folds: str | int = opt("loo", type=_folds, help="'loo' (leave-one-task-out) or a number of "
                           "folds over tasks")
    repeats: int = repeats_option()
    seed: int = opt(0)
    model2vec_epochs: int = opt(300, help="MODEL2VEC epochs per fold (it is refitted for every "
                                "held-out fold)")
    plots: bool = opt(True)
    image_size: int | None = opt(None, group=TRANSFER, help="image size the matrix was filled "
                                 "with; enables the LogME column, and the LEEP and NCE columns "
                                 "when every expert has a source head")
    max_per_class: int | None = opt(None, group=TRANSFER)
    features_seed: int = opt(0, group=TRANSFER)

    def __post_init__(self) -> None:
        problem = repeats_problem(self.repeats, self.folds)
        if problem:
            raise ValueError(problem)


@dataclass(frozen=True)
class EvaluateResult:
    """What a run produced: the evaluation, its report, and where the report was written
    (paths relative to the storage root)."""

    result: EvaluationResult
    markdown: str
    report: dict  # the content of table1.json
    folder: str  # evaluation/<run>
    markdown_path: str
    json_path: str


def parse_args(argv: list[str] | None = None) -> Config:
    return parse_config(Config, argv)


def _track(config: Config, root: StorageRoot, data: MetaDataset, table: Table1Report,
           cost) -> None:
    params = {"probe_id": data.probe_id, "method": data.method, "folds": _folds(config.folds),
              "repeats": config.repeats, "n_tasks": len(data.task_ids),
              "n_experts": len(data.expert_ids)}
    track_table1(root, data, table, params, figures=config.plots, tasks=read_tasks(root),
                 tracking_uri=config.tracking_uri, cost=cost)


def run(config: Config) -> EvaluateResult:
    """Evaluate the selectors on the root's meta-dataset, write the report, log it."""
    folds = _folds(config.folds)
    root = StorageRoot(config.root)
    data = load_meta_dataset(root, config.probe_id, config.method, mode=config.mode)
    log.info("evaluating selectors on %d tasks × %d experts", len(data.task_ids), len(data.expert_ids))
    context = None
    if config.image_size:
        context = transfer_context(root, data, config.image_size, config.max_per_class,
                                   config.features_seed)
    table = evaluate_table1(data, folds, seed=config.seed,
                            model2vec_epochs=config.model2vec_epochs,
                            error_floor=config.error_floor, context=context,
                            repeats=config.repeats)
    cost = cost_figure(data, table) if config.plots else None
    base = write_table1(root, table, figure=cost)
    log.info("wrote %s/table1.md and table1.json", root.join(base))
    if config.tracking:
        _track(config, root, data, table, cost)
    return EvaluateResult(table.result, table.markdown, table.payload, base,
                          f"{base}/table1.md", f"{base}/table1.json")


def main(argv: list[str] | None = None) -> int:
    # ValueError: nothing to evaluate, or options the data cannot meet
    return run_main(parse_args, run, argv, errors={ValueError: 1},
                    report=lambda config, outcome: print(outcome.markdown))


if __name__ == "__main__":
    sys.exit(main())
