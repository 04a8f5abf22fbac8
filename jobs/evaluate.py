"""Evaluate expert selectors on the zoo, in the form of the paper's Table 1.

    python -m jobs.evaluate --root ./t2v-data [--folds loo|K [--repeats N]]
        [--probe-id P --method M]

Every task is held out in turn (leave-one-task-out, or K folds over tasks, with --repeats N
averaged over N fold assignments); learned selectors are fitted on the other tasks only.
Beside the selectors, two reference rows: the oracle, and "Family best", which is told each
task's family and picks the expert best on that family's training tasks (what knowing the
family alone is worth).
Writes ``evaluation/<run>/table1.md`` and ``table1.json`` under the storage root
(``evaluation/LATEST`` names the newest run), prints the table next to the paper's numbers,
and logs metrics and plots to MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict

import numpy as np

from jobs._cli import (
    add_common_args,
    add_embedding_args,
    add_error_floor_arg,
    add_repeats_arg,
    check_repeats,
    run_stamp,
    setup_logging,
)
from t2v_core.recommend import evaluate as ev
from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.recommend.noise_floor import NoiseFloor, oracle_noise_floor
from t2v_core.recommend.selectors import (
    AsymTask2VecSelector,
    BruteForceSelector,
    ChanceSelector,
    FamilyBestSelector,
    GenericSelector,
    LEEPSelector,
    LogMESelector,
    MeanErrorPrior,
    Model2VecSelector,
    NCESelector,
    OracleSelector,
    Selector,
    Task2VecSelector,
    hard_predictions,
)
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.evaluate")

# Columns that need per-task inputs beyond embeddings and errors, each with the context key
# it reads (see t2v_core.recommend.selectors): the per-expert transferability scores, and the
# brute-force search on each cell's validation split.
CONTEXT_COLUMNS: dict[str, tuple[str, type[Selector]]] = {
    "LogME": ("features", LogMESelector),
    "LEEP": ("source_probs", LEEPSelector),
    "NCE": ("source_labels", NCESelector),
    "Brute force (val)": ("val_errors", BruteForceSelector),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_embedding_args(p)
    add_error_floor_arg(p)
    p.add_argument("--folds", default="loo",
                   help="'loo' (leave-one-task-out) or a number of folds over tasks")
    add_repeats_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model2vec-epochs", type=int, default=300,
                   help="MODEL2VEC epochs per fold (it is refitted for every held-out fold)")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    t = p.add_argument_group("LogME, LEEP and NCE baselines (from the matrix job's cached "
                             "expert features and the experts' source heads)")
    t.add_argument("--image-size", type=int, default=None,
                   help="image size the matrix was filled with; enables the LogME column, and "
                        "the LEEP and NCE columns when every expert has a source head")
    t.add_argument("--max-per-class", type=int, default=None)
    t.add_argument("--features-seed", type=int, default=0)
    args = p.parse_args(argv)
    check_repeats(p, args)
    return args


def _cached_features(root: StorageRoot, data: MetaDataset, experts: dict, image_size: int,
                     max_per_class: int | None, seed: int
                     ) -> tuple[list[list[np.ndarray]], list[np.ndarray]] | None:
    """Per task, every expert's cached training-split features, and the task's labels; None
    when some are missing (the matrix job computes them, this job never runs an expert)."""
    from t2v_core.matrix.features import FeatureCache, FeatureKey
    from t2v_core.zoo.manifest import read_tasks

    cache = FeatureCache(root)
    tasks = {t.task_id: t for t in read_tasks(root)}
    features, labels = [], []
    for task_id in data.task_ids:
        per_expert = []
        for expert_id in data.expert_ids:
            key = FeatureKey.for_cell(experts[expert_id], tasks[task_id], "train", image_size,
                                      max_per_class, seed)
            cached = cache.load(key)
            if cached is None:
                log.warning("no cached features for %s on %s: LogME, LEEP and NCE left out",
                            expert_id, task_id)
                return None
            per_expert.append(cached.features.astype(np.float64))
        features.append(per_expert)
        labels.append(cached.labels)
    return features, labels


def _source_heads(data: MetaDataset, experts: dict) -> list | None:
    """Every expert's source head, in ``data.expert_ids`` order; None if one has none."""
    from t2v_core.embedding.probes import WeightsError
    from t2v_core.matrix.experts import load_head

    heads = []
    for expert_id in data.expert_ids:
        try:
            head = load_head(experts[expert_id].weights_uri)
        except WeightsError as exc:
            log.warning("unreadable source head of %s (%s): LEEP and NCE left out", expert_id, exc)
            return None
        if head is None:
            log.warning("no source head for %s: LEEP and NCE left out", expert_id)
            return None
        heads.append(head)
    return heads


def _source_probs(heads: list, features: list[list[np.ndarray]]) -> list[list[np.ndarray]] | None:
    """Per task, per expert: the source head's softmax over its classes on the cached
    features, which are the backbone output the head was trained on."""
    try:
        return [[h.probabilities(f) for h, f in zip(heads, per_expert, strict=True)]
                for per_expert in features]
    except ValueError as exc:  # a head that does not fit its expert's features
        log.warning("source heads do not match the cached features (%s): LEEP and NCE left out",
                    exc)
        return None


def transfer_context(root: StorageRoot, data: MetaDataset, image_size: int,
                     max_per_class: int | None = None, seed: int = 0) -> dict | None:
    """What the per-expert transferability columns read, per task (item j = task j):
    ``features`` and ``labels`` (LogME); when every expert has a source head, also its
    ``source_probs`` (LEEP) and hard ``source_labels`` (NCE). None without the features:
    each of these baselines needs a forward pass of every expert over every task."""
    from t2v_core.zoo.manifest import read_experts

    experts = {e.expert_id: e for e in read_experts(root)}
    cached = _cached_features(root, data, experts, image_size, max_per_class, seed)
    if cached is None:
        return None
    features, labels = cached
    context: dict = {"features": features, "labels": labels}
    heads = _source_heads(data, experts)
    probs = None if heads is None else _source_probs(heads, features)
    if probs is not None:
        context["source_probs"] = probs
        context["source_labels"] = [[hard_predictions(p) for p in task] for task in probs]
    return context


def with_validation_errors(data: MetaDataset, context: dict | None) -> dict | None:
    """``context`` plus the matrix's validation errors, when every task has some."""
    val = data.val_errors
    if val is None or not np.isfinite(val).any(axis=1).all():
        return context
    return {**(context or {}), "val_errors": list(val)}


def with_context_columns(selectors: dict[str, Selector], context: dict | None
                         ) -> dict[str, Selector]:
    """The columns of :data:`CONTEXT_COLUMNS` whose inputs ``context`` carries, before Oracle."""
    for name, (key, cls) in CONTEXT_COLUMNS.items():
        if context and key in context:
            selectors = before_oracle(selectors, name, cls())
    return selectors


def before_oracle(selectors: dict[str, Selector], name: str, selector: Selector
                  ) -> dict[str, Selector]:
    """``selectors`` with ``name`` added as the row just above the oracle's."""
    rest = {k: v for k, v in selectors.items() if k != "Oracle"}
    oracle = {"Oracle": selectors["Oracle"]} if "Oracle" in selectors else {}
    return {**rest, name: selector, **oracle}


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
        error_floor: float = 0.02, context: dict | None = None, repeats: int = 1) -> dict:
    """The whole evaluation of one meta-dataset, as plain data plus the markdown table.
    ``context`` (see :func:`transfer_context`) adds the LogME, LEEP and NCE columns it has
    inputs for; the matrix's validation errors add the brute-force column."""
    context = with_validation_errors(data, context)
    selectors = with_context_columns(
        standard_selectors(data, seed=seed, model2vec_epochs=model2vec_epochs), context)
    if len(set(data.families)) > 1:
        selectors = before_oracle(selectors, "Family best", FamilyBestSelector(error_floor))
        context = {**(context or {}), "families": list(data.families)}
    result = ev.evaluate_selectors(
        selectors, data.embeddings, data.errors, data.expert_sources, list(data.expert_ids),
        list(data.families), folds=folds, random_state=seed, error_floor=error_floor,
        context=context, repeats=repeats,
    )
    recovery = ev.family_recovery(data.embeddings, list(data.families))
    difficulty = ev.norm_vs_difficulty(data.embeddings, data.errors)
    floor = noise_floor(data, error_floor)
    markdown = "\n\n".join([
        f"## Expert selection ({len(data.task_ids)} tasks × {len(data.expert_ids)} experts, "
        f"probe {data.probe_id}, {data.method} Fisher, {ev.folds_label(folds, repeats)}, "
        f"oracle errors floored at {error_floor:g})",
        ev.to_markdown(result, paper=True),
        f"Family recovery from embeddings alone (1-NN, d_sym): {recovery.accuracy:.1%} "
        f"(chance {recovery.chance_accuracy:.1%}).",
        f"Embedding norm vs the task's best error: Spearman ρ = {difficulty.spearman:.2f}.",
        *([] if floor is None else [noise_floor_sentence(floor)]),
    ])
    return {
        "result": result,
        "markdown": markdown,
        "json": {
            "table1": json.loads(ev.to_json(result)),
            "family_recovery": json.loads(ev.to_json(recovery)),
            "norm_vs_difficulty": json.loads(ev.to_json(difficulty)),
            "oracle_noise_floor": None if floor is None else asdict(floor),
            "probe_id": data.probe_id,
            "method": data.method,
            "error_floor": error_floor,
            "task_ids": list(data.task_ids),
            "expert_ids": list(data.expert_ids),
        },
    }


def noise_floor(data: MetaDataset, error_floor: float) -> NoiseFloor | None:
    """The oracle's test-noise floor, when the matrix records every task's test-set size
    (rows written before sizes were recorded: None)."""
    sizes = data.task_test_sizes()
    if sizes is None:
        log.info("the matrix does not record test-set sizes: no noise floor in the report")
        return None
    return oracle_noise_floor(data.errors, sizes, error_floor=error_floor)


def noise_floor_sentence(floor: NoiseFloor) -> str:
    low, high = floor.ci95_pct
    return (f"Test-noise floor: the truly best expert itself, re-measured on test sets of the "
            f"same size, scores +{floor.mean_pct:.1f}% over the re-measured oracle "
            f"(95% of re-measurements: +{low:.1f}% … +{high:.1f}%). The oracle is the luckiest "
            "of the experts' noisy test errors, so no selector can be expected below this; "
            "experts are re-measured independently, which makes it an upper bound.")


def write_report(root: StorageRoot, report: dict) -> str:
    run_id = run_stamp()
    base = f"evaluation/{run_id}"
    root.write_bytes_atomic(f"{base}/table1.md", report["markdown"].encode())
    root.write_bytes_atomic(f"{base}/table1.json",
                            json.dumps(report["json"], indent=2, allow_nan=False).encode())
    root.write_bytes_atomic("evaluation/LATEST", run_id.encode())
    return base


def _figures(data: MetaDataset) -> dict:
    from t2v_core.review import plots

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
        context = transfer_context(root, data, args.image_size, args.max_per_class,
                                   args.features_seed)
    report = run(data, folds, seed=args.seed, model2vec_epochs=args.model2vec_epochs,
                 error_floor=args.error_floor, context=context, repeats=args.repeats)
    base = write_report(root, report)
    print(report["markdown"])
    log.info("wrote %s/table1.md and table1.json", root.join(base))
    if args.tracking:
        from t2v_core.review import tracking

        tracking.configure(root, tracking_uri=args.tracking_uri)
        params = {"probe_id": data.probe_id, "method": data.method, "folds": folds,
                  "repeats": args.repeats, "n_tasks": len(data.task_ids),
                  "n_experts": len(data.expert_ids)}
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
