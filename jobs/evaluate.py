"""Evaluate expert selectors on the zoo, in the form of the paper's Table 1.

    python -m jobs.evaluate --root ./t2v-data [--folds loo|K] [--probe-id P --method M]

Every task is held out in turn (leave-one-task-out, or K folds over tasks); learned selectors
are fitted on the other tasks only. Writes ``evaluation/<run>/table1.md`` and ``table1.json``
under the storage root (``evaluation/LATEST`` names the newest run), prints the table next
to the paper's numbers, and logs metrics and plots to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from jobs._cli import (
    add_common_args,
    add_embedding_args,
    add_error_floor_arg,
    run_stamp,
    setup_logging,
)
from t2v_core import evaluate as ev
from t2v_core.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.selectors import (
    AsymTask2VecSelector,
    ChanceSelector,
    GenericSelector,
    LogMESelector,
    MeanErrorPrior,
    Model2VecSelector,
    OracleSelector,
    Selector,
    Task2VecSelector,
)
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_embedding_args(p)
    add_error_floor_arg(p)
    p.add_argument("--folds", default="loo",
                   help="'loo' (leave-one-task-out) or a number of folds over tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model2vec-epochs", type=int, default=300,
                   help="MODEL2VEC epochs per fold (it is refitted for every held-out fold)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    t = p.add_argument_group("LogME baseline (from the matrix job's cached expert features)")
    t.add_argument("--image-size", type=int, default=None,
                   help="image size the matrix was filled with; enables the LogME column")
    t.add_argument("--max-per-class", type=int, default=None)
    t.add_argument("--features-seed", type=int, default=0)
    return p.parse_args(argv)


def logme_context(root: StorageRoot, data: MetaDataset, image_size: int,
                  max_per_class: int | None = None, seed: int = 0) -> dict | None:
    """Per task, every expert's cached training-split features and the labels, or None when
    some are missing (LogME needs a forward pass of every expert over every task)."""
    from t2v_core.features import FeatureCache, FeatureKey
    from t2v_core.zoo import read_experts, read_tasks

    cache = FeatureCache(root)
    tasks = {t.task_id: t for t in read_tasks(root)}
    experts = {e.expert_id: e for e in read_experts(root)}
    features, labels = [], []
    for task_id in data.task_ids:
        per_expert = []
        for expert_id in data.expert_ids:
            key = FeatureKey.for_cell(experts[expert_id], tasks[task_id], "train", image_size,
                                      max_per_class, seed)
            cached = cache.load(key)
            if cached is None:
                log.warning("no cached features for %s on %s: LogME left out", expert_id, task_id)
                return None
            per_expert.append(cached.features.astype(np.float64))
        features.append(per_expert)
        labels.append(cached.labels)
    return {"features": features, "labels": labels}


def standard_selectors(data: MetaDataset, *, seed: int = 0, model2vec_epochs: int = 300
                       ) -> dict[str, Selector]:
    """The paper's columns, the static mean-error prior every recommender must beat, the oracle."""
    selectors: dict[str, Selector] = {"Chance": ChanceSelector(random_state=seed)}
    if data.generic_experts:
        selectors["ImageNet"] = GenericSelector(generic=data.generic_experts[0])
    selectors.update({
        "Mean-error prior": MeanErrorPrior(),
        "Task2Vec": Task2VecSelector(),
        "Asym Task2Vec": AsymTask2VecSelector(),
        "Model2Vec": Model2VecSelector(max_epochs=model2vec_epochs, random_state=seed),
        "Oracle": OracleSelector(),
    })
    return selectors


def run(data: MetaDataset, folds: str | int, *, seed: int = 0, model2vec_epochs: int = 300,
        error_floor: float = 0.02, context: dict | None = None) -> dict:
    """The whole evaluation of one meta-dataset, as plain data plus the markdown table.
    ``context`` (see :func:`logme_context`) adds the LogME column."""
    selectors = standard_selectors(data, seed=seed, model2vec_epochs=model2vec_epochs)
    if context:
        selectors = {**{k: v for k, v in selectors.items() if k != "Oracle"},
                     "LogME": LogMESelector(), "Oracle": selectors["Oracle"]}
    result = ev.evaluate_selectors(
        selectors, data.embeddings, data.errors, data.expert_sources, list(data.expert_ids),
        list(data.families), folds=folds, random_state=seed, error_floor=error_floor,
        context=context,
    )
    recovery = ev.family_recovery(data.embeddings, list(data.families))
    difficulty = ev.norm_vs_difficulty(data.embeddings, data.errors)
    markdown = "\n\n".join([
        f"## Expert selection ({len(data.task_ids)} tasks × {len(data.expert_ids)} experts, "
        f"probe {data.probe_id}, {data.method} Fisher, folds={folds}, "
        f"oracle errors floored at {error_floor:g})",
        ev.to_markdown(result, paper=True),
        f"Family recovery from embeddings alone (1-NN, d_sym): {recovery.accuracy:.1%} "
        f"(chance {recovery.chance_accuracy:.1%}).",
        f"Embedding norm vs the task's best error: Spearman ρ = {difficulty.spearman:.2f}.",
    ])
    return {
        "result": result,
        "markdown": markdown,
        "json": {
            "table1": json.loads(ev.to_json(result)),
            "family_recovery": json.loads(ev.to_json(recovery)),
            "norm_vs_difficulty": json.loads(ev.to_json(difficulty)),
            "probe_id": data.probe_id,
            "method": data.method,
            "error_floor": error_floor,
            "task_ids": list(data.task_ids),
            "expert_ids": list(data.expert_ids),
        },
    }


def write_report(root: StorageRoot, report: dict) -> str:
    run_id = run_stamp()
    base = f"evaluation/{run_id}"
    root.write_bytes_atomic(f"{base}/table1.md", report["markdown"].encode())
    root.write_bytes_atomic(f"{base}/table1.json",
                            json.dumps(report["json"], indent=2, allow_nan=False).encode())
    root.write_bytes_atomic("evaluation/LATEST", run_id.encode())
    return base


def _figures(data: MetaDataset) -> dict:
    from t2v_core import plots

    task_map = plots.task_map(data.embeddings, list(data.families), list(data.task_ids))
    heatmap, _ = plots.distance_heatmap(families=list(data.families), distances=task_map.distances)
    return {
        "task_map": task_map.figure,
        "distance_heatmap": heatmap,
        "error_matrix": plots.error_matrix_heatmap(data.errors, list(data.task_ids),
                                                   list(data.expert_ids),
                                                   task_families=list(data.families)),
        "norm_vs_error": plots.norm_vs_error(data.embeddings, data.errors, list(data.families))[0],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    folds: str | int = args.folds if args.folds == "loo" else int(args.folds)
    root = StorageRoot(args.root)
    data = load_meta_dataset(root, args.probe_id, args.method, mode=args.mode)
    log.info("evaluating selectors on %d tasks × %d experts", len(data.task_ids), len(data.expert_ids))
    context = None
    if args.image_size:
        context = logme_context(root, data, args.image_size, args.max_per_class,
                                args.features_seed)
    report = run(data, folds, seed=args.seed, model2vec_epochs=args.model2vec_epochs,
                 error_floor=args.error_floor, context=context)
    base = write_report(root, report)
    print(report["markdown"])
    log.info("wrote %s/table1.md and table1.json", root.join(base))
    if args.tracking:
        from t2v_core import tracking

        tracking.configure(root, tracking_uri=args.tracking_uri)
        params = {"probe_id": data.probe_id, "method": data.method, "folds": folds,
                  "n_tasks": len(data.task_ids), "n_experts": len(data.expert_ids)}
        with tracking.stage_run("evaluate", params):
            tracking.log_metrics(tracking.table1_metrics(report["result"]))
            import mlflow

            mlflow.log_text(report["markdown"], "table1.md")
            mlflow.log_dict(report["json"], "table1.json")
            if args.plots:
                tracking.log_figures(_figures(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
