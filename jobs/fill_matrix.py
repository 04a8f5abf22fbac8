"""Fill the task × expert performance matrix with Ray Tune.

    python -m jobs.fill_matrix --root ./t2v-data|s3://bucket/prefix [--mode probe|finetune]
        [--tasks PAT,..] [--experts PAT,..] [--shard i/n] [--num-samples K] [--max-cells N]
        [--max-per-class N]

For every (task, expert) cell of the zoo manifests that has no current row in ``matrix/``,
train a classifier for each of ``--num-samples`` hyper-parameter configurations (learning
rate and weight decay, log-uniform, seeded; the first is the centre of the range) and write
the best one, chosen on a validation split of the training data, as one matrix row.
Diverging configurations are recorded; a cell whose configurations all diverge becomes a
``failed`` row with the reason. Cells already in the matrix are skipped.

``--max-per-class N`` trains every cell on at most N training images per class (a seeded
subset); such cells are other cells than the full-data ones (the size is part of a row's key),
so matrices at several training-set sizes fill and resume independently.

Two layouts of work into Tune trials:

* ``batched`` (default for ``--mode probe``): a trial is one expert and up to
  ``--cells-per-trial`` tasks; it loads the expert once, reads (or computes and caches) the
  features of each task, and trains all heads of all its cells and configurations as one
  batched tensor program. Per-trial overhead is paid once per many cells.
* ``trial`` (default for ``--mode finetune``): one trial per (cell, configuration), Tune's
  grid over both. Each fine-tuning trial reports every epoch.

The schedule is a grid (or seeded random sample) of configurations; ASHA is not used because
its rungs would compare errors of *different* cells with each other.

Resuming: the Tune experiment lives under ``<root>/tune/<name>`` (local or S3 via
``storage_filesystem``) and a small pointer ``tune/_active/<plan>.json`` remembers the
experiment of an unfinished run. A re-run with the same selection restores it with
``Tuner.restore`` (finished trials are kept, unfinished and errored ones run again), then
plans whatever is still missing. Rows are written as each trial completes, so a killed job
loses at most its running trials.

Workers reach an ``s3://`` root with the AWS variables of the driver, which this job forwards
through the Ray ``runtime_env`` when it starts or connects to Ray itself (on clusters with
instance roles none are set and nothing is forwarded; a Ray already initialised in this
process is used as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from jobs._cli import add_tracking_args, record_stage

if TYPE_CHECKING:
    from t2v_core.matrix.rows import MatrixRow

log = logging.getLogger("jobs.fill_matrix")

_ACTIVE_DIR = "tune/_active"


# -- arguments -----------------------------------------------------------------------------
def _range(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    lo_f, hi_f = float(lo), float(hi or lo)
    if not 0 < lo_f <= hi_f:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH, got {text!r}")
    return lo_f, hi_f


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard index must be in [0, {n}), got {i}")
    return i, n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.fill_matrix",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", default="./t2v-data", help="storage root (path or s3://bucket/prefix)")
    add_tracking_args(p, default="only inside a pipeline run")
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe",
                   help="probe: head on frozen cached features; finetune: whole network")
    p.add_argument("--tasks", default=None, help="comma-separated task ids or glob patterns")
    p.add_argument("--experts", default=None, help="comma-separated expert ids or glob patterns")
    p.add_argument("--shard", type=_shard, default=None,
                   help="i/n: fill only the cells whose key hash falls in shard i of n")
    p.add_argument("--max-cells", type=int, default=None,
                   help="fill at most this many missing cells in this run")
    p.add_argument("--retry-failed", action="store_true", help="re-train cells recorded as failed")
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, default=4, help="configurations per cell")
    g.add_argument("--lr", type=_range, default=None,
                   help="learning-rate range LOW,HIGH (default 1e-3,1e-1)")
    g.add_argument("--weight-decay", type=_range, default=(1e-6, 1e-2), help="range LOW,HIGH")
    g.add_argument("--layout", choices=["auto", "batched", "trial"], default="auto",
                   help="batched: many cells and configs per trial; trial: one (cell, config) "
                        "per trial; auto: batched for probe, trial for finetune")
    g.add_argument("--cells-per-trial", type=int, default=32, help="cells per batched trial")
    g.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("recipe")
    r.add_argument("--epochs", type=int, default=None,
                   help="probe: full-batch Adam steps (300); finetune: epochs (10)")
    r.add_argument("--hidden", type=int, default=0, help="probe head hidden width (0: linear)")
    r.add_argument("--batch-size", type=int, default=32, help="finetune batch size")
    r.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: the expert architecture's)")
    r.add_argument("--max-per-class", type=int, default=None,
                   help="cap on training images per class; capped cells are kept apart from "
                        "the full-data ones (default: all images)")
    r.add_argument("--max-test-per-class", type=int, default=None, help="cap on test images/class")
    r.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class's training images used to pick the configuration")
    x = p.add_argument_group("execution")
    x.add_argument("--address", default=None,
                   help="Ray address to connect to ('auto', host:port); default: $RAY_ADDRESS, "
                        "else a new local Ray")
    x.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    x.add_argument("--cpus-per-trial", type=float, default=1.0)
    x.add_argument("--gpus-per-trial", type=float, default=0.0)
    x.add_argument("--max-concurrent-trials", type=int, default=None)
    x.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial")
    x.add_argument("--name", default=None, help="Tune experiment name (default: from the plan)")
    x.add_argument("--summary-json", default=None, help="also write the run summary here")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.add_argument("-v", "--verbose", action="store_true", help="debug logs and Tune's status table")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.cells_per_trial < 1:
        p.error("--num-samples and --cells-per-trial must be at least 1")
    if args.max_per_class is not None and args.max_per_class < 1:
        p.error("--max-per-class must be at least 1")
    if args.layout == "auto":
        args.layout = "batched" if args.mode == "probe" else "trial"
    if args.epochs is None:
        args.epochs = 300 if args.mode == "probe" else 10
    if args.lr is None:
        args.lr = (1e-3, 1e-1)
    return args


# -- the work of one trial (no Ray here: the benchmark calls it in a plain loop) ------------
def _outcome(task, expert, result, *, configs_tried: int, diverged: int, seconds: float,
             device: str, probe_id: str = "", best_hp: dict | None = None) -> dict:
    return {
        "task_id": task.task_id, "expert_id": expert.expert_id,
        "task_hash": task.content_hash, "expert_hash": expert.content_hash,
        "status": result.status, "error": result.error,
        "test_error": result.test_error, "train_error": result.train_error,
        "val_error": result.val_error, "val_loss": result.val_loss,
        "train_loss": result.train_loss, "n_train": result.n_train, "n_val": result.n_val,
        "n_test": result.n_test,
        "epochs": result.epochs, "hp": best_hp or {}, "configs_tried": configs_tried,
        "diverged": diverged, "seconds": seconds, "device": device, "probe_id": probe_id,
    }


def _input_failure(task, expert, exc: Exception, n_configs: int, device: str) -> dict:
    from t2v_core.matrix.finetune import TrainResult

    res = TrainResult("failed", None, None, None, None, None, 0, 0.0, 0, 0,
                      error=f"input error: {type(exc).__name__}: {exc}")
    return _outcome(task, expert, res, configs_tried=n_configs, diverged=0, seconds=0.0,
                    device=device)


def fill_unit(job: dict, unit: dict, configs: list[dict], on_epoch=None) -> dict:
    """Train every configuration of every cell of ``unit`` (one expert, some tasks) and return
    the best result per cell. Input errors that no retry can fix (a task that no longer
    reads, weights that do not load) become failed cells; anything else raises."""
    import torch

    from t2v_core.embedding.probes import WeightsError, build_probe
    from t2v_core.matrix.features import FeatureCache, cell_features
    from t2v_core.matrix.finetune import FinetuneRecipe, HeadConfig, ProbeRecipe, select_best
    from t2v_core.storage import StorageRoot
    from t2v_core.zoo.data import DataError, UnreadableURIError
    from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

    start = time.perf_counter()
    root = StorageRoot(job["root"])
    cache = FeatureCache(root)
    expert = ExpertSpec(**unit["expert"])
    tasks = [TaskSpec(**t) for t in unit["tasks"]]
    hps = [HeadConfig(**c) for c in configs]
    data = job["data"]
    size = int(unit["image_size"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = None

    def backbone():
        nonlocal probe
        if probe is None:
            probe = build_probe(expert.arch, expert.weights_uri, seed=0, input_size=size)
        return probe.backbone, probe.probe_id

    cells: list[dict] = []
    if job["mode"] == "probe":
        from t2v_core.matrix.finetune import fit_heads, make_problem

        recipe = ProbeRecipe(**job["recipe"])
        problems, ready, feat_seconds = [], [], []
        for task in tasks:
            t0 = time.perf_counter()
            try:
                tr = cell_features(cache, backbone, expert, task, "train", size,
                                   max_per_class=data["max_per_class"], seed=data["seed"],
                                   device=device)
                te = cell_features(cache, backbone, expert, task, "test", size,
                                   max_per_class=data["max_test_per_class"], seed=data["seed"],
                                   device=device)
            except UnreadableURIError:
                raise
            except (DataError, WeightsError) as exc:
                cells.append(_input_failure(task, expert, exc, len(hps), device))
                continue
            problems.append(make_problem(torch.from_numpy(tr.features), torch.from_numpy(tr.labels),
                                         torch.from_numpy(te.features), torch.from_numpy(te.labels),
                                         task.n_classes, data["val_fraction"], data["seed"]))
            ready.append((task, tr.probe_id))
            feat_seconds.append(time.perf_counter() - t0)
        if problems:
            results = fit_heads(problems, hps, recipe, device)
            for (task, probe_id), res, fs in zip(ready, results, feat_seconds, strict=True):
                best = select_best(res)
                pick = res[best] if best is not None else next(r for r in res if not r.ok)
                cells.append(_outcome(
                    task, expert, pick, configs_tried=len(res),
                    diverged=sum(not r.ok for r in res),
                    seconds=fs + sum(r.seconds for r in res), device=device, probe_id=probe_id,
                    best_hp=hps[best].to_dict() if best is not None else None))
    else:
        from t2v_core.matrix.finetune import ImageProblem, finetune_cell
        from t2v_core.zoo.data import load_split

        recipe = FinetuneRecipe(**job["recipe"])
        for task in tasks:
            t0 = time.perf_counter()
            try:
                bb, probe_id = backbone()
                x, y = load_split(task, "train", size, data["max_per_class"], data["seed"])
                xt, yt = load_split(task, "test", size, data["max_test_per_class"], data["seed"])
            except UnreadableURIError:
                raise
            except (DataError, WeightsError) as exc:
                cells.append(_input_failure(task, expert, exc, len(hps), device))
                continue
            prob = ImageProblem.with_validation(x, y, xt, yt, task.n_classes,
                                                data["val_fraction"], data["seed"])
            res = [finetune_cell(bb, prob, hp, recipe, device, on_epoch) for hp in hps]
            best = select_best(res)
            pick = res[best] if best is not None else res[0]
            cells.append(_outcome(
                task, expert, pick, configs_tried=len(res), diverged=sum(not r.ok for r in res),
                seconds=time.perf_counter() - t0, device=device, probe_id=probe_id,
                best_hp=hps[best].to_dict() if best is not None else None))
    return {"cells": cells, "feature_hits": cache.hits, "feature_misses": cache.misses,
            "seconds": time.perf_counter() - start, "device": device}


def run_trial(config: dict) -> None:
    """The Tune trainable: one unit of cells; reports the cells' outcomes as JSON."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, int(config["job"].get("threads", 1))))
    if _already_written(config["job"], config["unit"]):
        # A restored experiment whose state predates this trial's completion (the driver
        # was killed): the rows are in the matrix, nothing to recompute.
        tune.report({"cells_json": "[]", "n_cells": 0, "skipped": 1, "done": True})
        return
    on_epoch = None
    if config["job"]["mode"] == "finetune":
        def on_epoch(metrics: dict) -> None:
            tune.report({k: v for k, v in metrics.items() if v is not None})
    out = fill_unit(config["job"], config["unit"], config["configs"], on_epoch)
    ok = [c for c in out["cells"] if c["status"] == "ok"]
    tune.report({
        "cells_json": json.dumps(out["cells"]),
        "n_cells": len(out["cells"]),
        "n_failed": len(out["cells"]) - len(ok),
        "best_val_error": min((c["val_error"] for c in ok if c["val_error"] is not None),
                              default=float("nan")),
        "feature_hits": out["feature_hits"],
        "feature_misses": out["feature_misses"],
        "unit_seconds": out["seconds"],
        "done": True,
    })


def _already_written(job: dict, unit: dict) -> bool:
    from t2v_core.matrix.rows import written
    from t2v_core.storage import StorageRoot
    from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

    return written(StorageRoot(job["root"]), [TaskSpec(**t) for t in unit["tasks"]],
                   ExpertSpec(**unit["expert"]), job["mode"], job["data"]["max_per_class"])


def _trial_name(trial) -> str:
    return f"unit_{trial.trial_id}"


# -- combining trials into matrix rows ------------------------------------------------------
def combine(outcomes: list[dict], job: dict, layout: str) -> MatrixRow:
    """One matrix row from the outcomes of one cell (one per trial that trained it)."""
    from t2v_core.matrix.rows import MatrixRow

    def key(o):
        if o["val_error"] is not None:
            return (o["val_error"], o["val_loss"])
        return (o["train_error"], o["train_loss"])

    ok = [o for o in outcomes if o["status"] == "ok"]
    pick = min(ok, key=key) if ok else outcomes[0]
    tried = sum(o["configs_tried"] for o in outcomes)
    diverged = sum(o["diverged"] for o in outcomes)
    error = pick["error"]
    if not ok and diverged:
        error = f"all {tried} configurations diverged; first: {error}"
    config = {
        "mode": job["mode"], "hp": pick["hp"], "recipe": job["recipe_full"], "data": job["data"],
        "val_error": pick["val_error"], "n_val": pick["n_val"], "n_test": pick.get("n_test"),
        "configs_tried": tried,
        "diverged": diverged, "device": pick["device"], "layout": layout,
        "probe_id": pick["probe_id"], "code_version": job["code_version"],
        "search": job["search"],
    }
    return MatrixRow(
        task_id=pick["task_id"], expert_id=pick["expert_id"], mode=job["mode"],
        status="ok" if ok else "failed", test_error=pick["test_error"],
        train_error=pick["train_error"], n_train=int(pick["n_train"]), epochs=int(pick["epochs"]),
        trials=int(tried), gpu_seconds=float(sum(o["seconds"] for o in outcomes)),
        task_hash=pick["task_hash"], expert_hash=pick["expert_hash"], config=config, error=error,
        max_per_class=job["data"]["max_per_class"],
    )


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class _Collector:
    """Groups reported outcomes by cell; a cell is complete once every trial that trains it
    has reported."""

    def __init__(self, expected: dict[str, int]):
        self.expected = expected
        self.outcomes: dict[str, list[dict]] = defaultdict(list)

    def add(self, outcomes: list[dict]) -> list[str]:
        done = []
        for o in outcomes:
            k = _cell_key(o["task_id"], o["expert_id"])
            self.outcomes[k].append(o)
            if len(self.outcomes[k]) == self.expected.get(k, 1):
                done.append(k)
        return done


def _cell_key(task_id: str, expert_id: str) -> str:
    return f"{task_id}\0{expert_id}"


def _make_writer(root_uri: str, job: dict, layout: str, expected: dict[str, int], progress: bool):
    """A Tune callback (runs in the driver) that writes each cell's row as soon as all of its
    trials have completed, and drives the progress bar."""
    Callback = _tune_callback_base()

    class MatrixWriter(Callback):
        def __init__(self):
            self.root_uri, self.job, self.layout = root_uri, job, layout
            self.expected, self.progress = expected, progress
            self._setup()

        def _setup(self):
            self._collector = _Collector(self.expected)
            self._bar = None

        def __getstate__(self):  # pickled into the experiment state: no live objects
            return {k: v for k, v in self.__dict__.items() if k not in ("_collector", "_bar")}

        def __setstate__(self, state):
            self.__dict__.update(state)
            self._setup()

        def setup(self, **info):
            if self.progress and self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=len(self.expected), desc="matrix cells", unit="cell")

        def on_trial_complete(self, iteration, trials, trial, **info):
            from t2v_core.matrix.rows import write_rows
            from t2v_core.storage import StorageRoot

            outcomes = json.loads((trial.last_result or {}).get("cells_json") or "[]")
            keys = self._collector.add(outcomes)
            if not keys:
                return
            rows = [combine(self._collector.outcomes[k], self.job, self.layout) for k in keys]
            write_rows(StorageRoot(self.root_uri), rows)
            if self._bar is not None:
                self._bar.update(len(rows))

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed; its cells stay missing and are retried on the next run",
                        trial.trial_id)

        def on_experiment_end(self, trials, **info):
            if self._bar is not None:
                self._bar.close()

    return MatrixWriter()


# -- planning -------------------------------------------------------------------------------
def _select(items, patterns: str | None, attr: str, what: str):
    if not patterns:
        return list(items)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    ids = [getattr(i, attr) for i in items]
    for p in pats:
        if not any(fnmatch.fnmatchcase(x, p) for x in ids):
            raise SystemExit(f"no {what} matches {p!r}")
    return [i for i in items if any(fnmatch.fnmatchcase(getattr(i, attr), p) for p in pats)]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _image_size(arch: str, override: int | None, cache: dict) -> int:
    if override:
        return override
    if arch not in cache:
        from t2v_core.embedding.probes import build_probe

        cache[arch] = build_probe(arch, None).input_size
    return cache[arch]


def _spec_dict(spec) -> dict:
    d = asdict(spec)
    if "classes" in d:
        d["classes"] = list(d["classes"])
    return d


def plan(cells, args, configs: list[dict]) -> tuple[list[dict], list[list[dict]], dict[str, int]]:
    """Tune's grid: the units (one expert, some tasks), the configuration lists each unit is
    trained with, and how many trials report each cell."""
    sizes: dict[str, int] = {}
    by_expert: dict[str, list] = defaultdict(list)
    experts = {}
    for task, expert in cells:
        by_expert[expert.expert_id].append(task)
        experts[expert.expert_id] = expert
    per_trial = args.cells_per_trial if args.layout == "batched" else 1
    units = []
    for eid, tasks in by_expert.items():
        e = experts[eid]
        size = _image_size(e.arch, args.image_size, sizes)
        for i in range(0, len(tasks), per_trial):
            units.append({"expert": _spec_dict(e), "image_size": size,
                          "tasks": [_spec_dict(t) for t in tasks[i : i + per_trial]]})
    if args.layout == "batched":
        config_lists, per_cell = [configs], 1
    else:
        config_lists, per_cell = [[c] for c in configs], len(configs)
    expected = {_cell_key(t.task_id, e.expert_id): per_cell for t, e in cells}
    return units, config_lists, expected


# -- Ray and Tune ---------------------------------------------------------------------------
def init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless this process already did, with the driver's AWS_* and
    MLFLOW_* variables for every worker (Tune's trials reach an s3:// root with them).
    Returns whether this call initialised Ray."""
    from jobs._ray_util import init_ray as connect
    from jobs._ray_util import worker_runtime_env

    return connect(address, local_cpus=num_cpus, runtime_env=worker_runtime_env())


def tune_storage(root) -> tuple[str, object | None]:
    """Tune's ``storage_path`` and ``storage_filesystem`` for the storage root: a local
    directory, or an fsspec filesystem wrapped for pyarrow with a ``bucket/prefix`` path."""
    if root.local:
        return root.join("tune"), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return f"{root.path}/tune", PyFileSystem(FSSpecHandler(root.fs))


def _run_tuner(name, units, config_lists, job, args, root, writer, resume: bool):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    storage_path, fs = tune_storage(root)
    exp_path = f"{storage_path}/{name}"
    trainable = tune.with_resources(run_trial, {"cpu": args.cpus_per_trial,
                                                "gpu": args.gpus_per_trial})
    if resume:
        log.info("resuming Tune experiment %s", name)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"unit": tune.grid_search(units),
                         "configs": tune.grid_search(config_lists), "job": job},
            tune_config=tune.TuneConfig(
                num_samples=1, max_concurrent_trials=args.max_concurrent_trials,
                reuse_actors=True, trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                callbacks=[writer, JsonLoggerCallback()], verbose=1 if args.verbose else 0),
        )
    return tuner.fit()


def _grid_outcomes(grid, since: float) -> tuple[list[dict], dict]:
    outcomes, stats = [], defaultdict(int)
    for res in grid:
        if res.error is not None:
            stats["trials_errored"] += 1
            log.warning("trial failed: %s", str(res.error).splitlines()[-1][:300])
            continue
        m = res.metrics or {}
        if "cells_json" not in m:
            continue
        outcomes.extend(json.loads(m["cells_json"]))
        if m.get("timestamp", 0) >= since:
            if m.get("skipped"):
                stats["trials_skipped"] += 1
                continue
            stats["trials_run"] += 1
            stats["feature_hits"] += int(m.get("feature_hits", 0))
            stats["feature_misses"] += int(m.get("feature_misses", 0))
    return outcomes, stats


def _write_remaining(root, outcomes, planned: set[str], job, layout, tasks, experts) -> int:
    """Rows for the planned cells that have outcomes but no row yet (the writer callback of a
    restored experiment only sees the trials it ran itself)."""
    from t2v_core.matrix.rows import done_cells, write_rows

    done = {_cell_key(*c) for c in done_cells(root, tasks, experts, job["mode"],
                                              max_per_class=job["data"]["max_per_class"])}
    by_cell = defaultdict(list)
    for o in outcomes:
        k = _cell_key(o["task_id"], o["expert_id"])
        if k in planned and k not in done:
            by_cell[k].append(o)
    if by_cell:
        write_rows(root, [combine(v, job, layout) for v in by_cell.values()])
    return len(by_cell)


@contextlib.contextmanager
def _tune_env():
    """Tune's classic, quiet console output (its status table only with -v), and only the
    JSON result logger (added explicitly) instead of JSON + CSV + TensorBoard per trial;
    restored afterwards for callers that run the job in-process."""
    saved = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS")}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fill(args: argparse.Namespace) -> dict:
    """Plan, run (or resume) and record; returns the run summary."""
    with _tune_env():
        return _fill(args)


def _fill(args: argparse.Namespace) -> dict:
    from t2v_core import __version__
    from t2v_core.matrix.finetune import FinetuneRecipe, ProbeRecipe, SearchSpace
    from t2v_core.matrix.rows import done_cells, missing_cells
    from t2v_core.storage import StorageRoot, redact_uri
    from t2v_core.zoo.manifest import read_experts, read_tasks

    started = time.time()
    root = StorageRoot(args.root)
    tasks = _select(read_tasks(root), args.tasks, "task_id", "task")
    experts = _select(read_experts(root), args.experts, "expert_id", "expert")
    if args.mode == "probe":
        recipe = ProbeRecipe(epochs=args.epochs, hidden=args.hidden, seed=args.seed)
    else:
        recipe = FinetuneRecipe(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    space = SearchSpace(lr=args.lr, weight_decay=args.weight_decay)
    configs = [c.to_dict() for c in space.sample(args.num_samples, args.seed)]
    job = {
        "root": root.uri, "mode": args.mode,
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in ("mode", "version")},
        "recipe_full": recipe.to_dict(),
        "data": {"max_per_class": args.max_per_class, "max_test_per_class": args.max_test_per_class,
                 "val_fraction": args.val_fraction, "seed": args.seed, "image_size": args.image_size},
        "search": {"lr": list(args.lr), "weight_decay": list(args.weight_decay),
                   "num_samples": args.num_samples, "seed": args.seed},
        "code_version": __version__, "threads": max(1, int(args.cpus_per_trial)),
    }
    requested = missing_cells(tasks, experts, set(), shard=args.shard)
    base = args.name or "matrix-{}-{}".format(args.mode, _digest({
        "cells": sorted((t.task_id, t.content_hash, e.expert_id, e.content_hash)
                        for t, e in requested),
        "job": {k: v for k, v in job.items() if k != "root"}, "layout": args.layout,
        "per_trial": args.cells_per_trial}))
    summary = {"root": redact_uri(root.uri), "mode": args.mode, "layout": args.layout,
               "max_per_class": args.max_per_class,
               "experiment": base, "tasks": len(tasks), "experts": len(experts),
               "requested": len(requested), "resumed": False, "trials_run": 0,
               "trials_errored": 0, "trials_skipped": 0, "feature_hits": 0,
               "feature_misses": 0, "planned": 0,
               "interrupted": False}
    pointer = f"{_ACTIVE_DIR}/{base}.json"
    attempted: set[str] = set()

    def execute(name, units, config_lists, expected, resume, n_trials):
        nonlocal attempted
        writer = _make_writer(root.uri, job, args.layout, expected, not args.no_progress)
        root.write_bytes_atomic(pointer, json.dumps({"name": name, "state": "running",
                                                     "trials": n_trials}).encode())
        t0 = int(time.time())
        grid = _run_tuner(name, units, config_lists, job, args, root, writer, resume)
        outcomes, stats = _grid_outcomes(grid, t0)
        for k, v in stats.items():
            summary[k] += v
        planned = set(expected) if expected else {_cell_key(o["task_id"], o["expert_id"])
                                                  for o in outcomes}
        attempted |= planned
        _write_remaining(root, outcomes, planned, job, args.layout, tasks, experts)
        # Tune creates trials lazily, so an interrupted grid simply has fewer trials.
        if grid.num_terminated + grid.num_errors < n_trials:
            # Stopped early (SIGINT, preemption): keep the pointer so the next run resumes.
            log.warning("run interrupted; re-run the same command to resume %s", name)
            summary["interrupted"] = True
            return False
        root.write_bytes_atomic(pointer, json.dumps({"name": name, "state": "done"}).encode())
        return True

    if root.exists(pointer):
        from ray import tune

        state = json.loads(root.read_bytes(pointer))
        storage_path, fs = tune_storage(root)
        path = f"{storage_path}/{state['name']}"
        if state.get("state") == "running" and tune.Tuner.can_restore(path, storage_filesystem=fs):
            init_ray(args.address, args.num_cpus)
            summary["resumed"] = True
            try:
                finished = execute(state["name"], None, None, {}, True, state["trials"])
            except Exception as exc:  # unreadable state: the matrix itself says what is left
                log.warning("cannot resume %s (%s: %s); planning the missing cells afresh",
                            state["name"], type(exc).__name__, exc)
                finished, summary["resumed"] = True, False
            if not finished:
                return _finish(summary, root, args, tasks, experts, requested, started)

    done = done_cells(root, tasks, experts, args.mode, retry_failed=args.retry_failed,
                      max_per_class=args.max_per_class)
    todo = [(t, e) for t, e in requested if (t.task_id, e.expert_id) not in done
            and _cell_key(t.task_id, e.expert_id) not in attempted]
    summary["already_done"] = len(requested) - len(todo)
    if args.max_cells is not None:
        todo = todo[: args.max_cells]
    summary["planned"] = len(todo)
    log.info("%d tasks × %d experts (%s per class): %d cells requested, %d done, %d to fill now "
             "(%s layout)", len(tasks), len(experts), args.max_per_class or "all images",
             len(requested), summary["already_done"], len(todo), args.layout)
    if todo:
        init_ray(args.address, args.num_cpus)
        units, config_lists, expected = plan(todo, args, configs)
        name = f"{base}-{_digest(sorted(expected))}"
        n_trials = len(units) * len(config_lists)
        log.info("Tune experiment %s: %d trials", name, n_trials)
        execute(name, units, config_lists, expected, False, n_trials)
    return _finish(summary, root, args, tasks, experts, requested, started)


def _finish(summary, root, args, tasks, experts, requested, started) -> dict:
    from t2v_core.matrix.rows import read_matrix

    final = read_matrix(root, mode=args.mode, tasks=tasks, experts=experts,
                        max_per_class=args.max_per_class).to_pylist()
    want = {(t.task_id, e.expert_id) for t, e in requested}
    rows = [r for r in final if (r["task_id"], r["expert_id"]) in want]
    summary.update(
        cells_ok=sum(r["status"] == "ok" for r in rows),
        cells_failed=sum(r["status"] != "ok" for r in rows),
        cells_missing=len(want) - len(rows),
        seconds=round(time.time() - started, 2),
        mean_test_error=(sum(r["test_error"] for r in rows if r["status"] == "ok")
                         / max(1, sum(r["status"] == "ok" for r in rows))),
    )
    for r in rows:
        if r["status"] != "ok" and r["task_id"] and r["error"]:
            log.warning("cell %s × %s failed: %s", r["task_id"], r["expert_id"], r["error"])
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        summary = fill(args)
    log.info(
        "matrix %s (%s): %d/%d cells ok, %d failed, %d missing; %d trials run here "
        "(%d errored, %d skipped as already written), features %d cached / %d computed, %.1fs%s",
        summary["root"], summary["mode"], summary["cells_ok"], summary["requested"],
        summary["cells_failed"], summary["cells_missing"], summary["trials_run"],
        summary["trials_errored"], summary["trials_skipped"], summary["feature_hits"],
        summary["feature_misses"],
        summary["seconds"], ", resumed an interrupted run" if summary["resumed"] else "",
    )
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    record_stage(args, "fill_matrix",
                 {"mode": summary["mode"], "num_samples": args.num_samples,
                  "max_per_class": args.max_per_class},
                 {k: summary[k] for k in ("cells_ok", "cells_failed", "cells_missing",
                                          "trials_run", "feature_hits", "feature_misses")})
    # A budgeted run (--max-cells) leaves cells for the next run on purpose.
    incomplete = summary["cells_missing"] and args.max_cells is None
    if summary["interrupted"]:
        return 130
    return 1 if summary["trials_errored"] or incomplete else 0


if __name__ == "__main__":
    # Run as the importable module so that Tune pickles the trainable by reference.
    from jobs.fill_matrix import main as _main

    sys.exit(_main())
