"""What a performance-matrix cell costs, and what the 1,460 × 156 matrix would cost.

Measured here, on a synthetic zoo of PNG tasks:

* seconds per cell in probe mode with a cold and a warm feature cache;
* trials per second through Ray Tune against a plain loop over the same work
  (``jobs.fill_matrix`` end to end, one (cell, configuration) per trial; the loop calls
  :mod:`t2v_core.matrix.cells` directly), and cells per second of the batched layout (one
  trial per expert and many cells);
* many probe heads trained as one batched program against one at a time;
* the CPU cost of a ResNet-34 forward pass at 224 px,

then projected to the paper's matrix in GPU-hours, next to its ~1,300 GPU-hours for 4,100
classifiers. The GPU cost per image is the one-core CPU measurement divided by
``--cpu-to-gpu`` (an assumption, printed with the GPU throughput it implies).

    python -m benchmarks.matrix_cost [--tasks 8] [--samples 4] [--cpu-to-gpu 100]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import report, timed
from t2v_core.matrix.cells import CellUnit, FillConfig, combine, train_unit
from t2v_core.matrix.finetune import ProbeRecipe
from t2v_core.matrix.rows import write_rows

log = logging.getLogger("benchmarks.matrix_cost")

PAPER_GPU_HOURS = 1300.0
PAPER_CLASSIFIERS = 4100
N_TASKS, N_EXPERTS = 1460, 156


def write_zoo(base: Path, n_tasks: int, size: int, n_train: int, n_test: int, classes: int):
    """Tasks of coloured noise with a class-dependent mean colour (content is irrelevant to
    cost), registered with three experts: two small CNNs and a ResNet-18."""
    from t2v_core.embedding.probes import build_probe, load_state_dict, save_weights, weights_digest
    from t2v_core.zoo.data import scan_task
    from t2v_core.zoo.manifest import ExpertSpec, upsert_experts, upsert_tasks

    specs = []
    for t in range(n_tasks):
        task = base / "tasks" / f"task{t:02d}"
        for split, n in (("train", n_train), ("test", n_test)):
            for c in range(classes):
                d = task / split / f"c{c}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    rng = np.random.default_rng(zlib.crc32(f"{t}/{split}/{c}/{i}".encode()))
                    mean = np.array([(c * 53 + t * 17) % 256, (c * 97) % 256, (t * 31) % 256])
                    px = np.clip(mean + rng.normal(0, 60, (size, size, 3)), 0, 255)
                    Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
        specs.append(scan_task(str(task))[0])
    root = base / "root"
    upsert_tasks(str(root), specs)
    experts = []
    for eid, arch, seed in (("cnn0", "small_cnn", 0), ("cnn1", "small_cnn", 1),
                            ("r18", "resnet18", 0)):
        uri = str(base / "weights" / f"{eid}.pt")
        save_weights(build_probe(arch, seed=seed).backbone, uri)
        experts.append(ExpertSpec(eid, arch, uri, None, weights_digest(load_state_dict(uri))))
    upsert_experts(str(root), experts)
    return root, specs, experts


def fresh_root(src: Path, base: Path, with_features: bool) -> Path:
    """A copy of the zoo manifests (and the feature cache) with an empty matrix."""
    dst = base / f"root-{uuid.uuid4().hex[:6]}"
    shutil.copytree(src / "zoo", dst / "zoo")
    if with_features and (src / "features").exists():
        shutil.copytree(src / "features", dst / "features")
    return dst


def fill_config(root: Path, size: int, samples: int) -> FillConfig:
    """The settings the job's trials train cells with here."""
    return FillConfig(root=str(root), recipe=ProbeRecipe(epochs=200), num_samples=samples,
                      image_size=size, layout="trial")


def warm_cache(root: Path, size: int, tasks, expert) -> None:
    fill = fill_config(root, size, 1)
    train_unit(fill, CellUnit(expert, tuple(tasks), size), fill.configs())


def per_cell_seconds(root: Path, size: int, samples: int, experts, tasks, base: Path) -> list[dict]:
    """One cell at a time through the core (no Ray): cold cache, then warm cache."""
    rows = []
    for expert in experts:
        fill = fill_config(fresh_root(root, base, with_features=False), size, samples)
        configs = fill.configs()
        timings = {"cold": [], "warm": []}
        for state in ("cold", "warm"):
            for task in tasks:
                t, out = timed(train_unit, fill, CellUnit(expert, (task,), size), configs)
                assert out.outcomes[0].result.ok
                timings[state].append(t)
        cold, warm = statistics.median(timings["cold"]), statistics.median(timings["warm"])
        rows.append({"measure": f"probe cell, {expert.arch} @{size}px, {samples} configs",
                     "cold_cache_s": cold, "warm_cache_s": warm, "speedup": cold / warm})
    return rows


def tune_vs_loop(root: Path, size: int, samples: int, tasks, expert, base: Path) -> list[dict]:
    """The same (cell, configuration) trials through jobs.fill_matrix (Ray Tune) and through
    a plain loop over the core's unit function; and the batched layout."""
    import ray

    from jobs import fill_matrix

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        n_trials = len(tasks) * samples
        selection = {"experts": expert.expert_id, "tasks": ",".join(t.task_id for t in tasks)}
        res = {}
        for label, layout in (
            ("tune, 1 trial per (cell, config), 1 at a time", {"layout": "trial",
                                                               "max_concurrent_trials": 1}),
            ("tune, 1 trial per (cell, config), 2 CPUs", {"layout": "trial"}),
            ("tune, batched: 1 trial for all cells", {"layout": "batched"}),
        ):
            config = fill_matrix.Config(
                root=str(fresh_root(root, base, with_features=True)), image_size=size,
                num_samples=samples, epochs=200, no_progress=True, tracking=False,
                **selection, **layout)
            t0 = time.perf_counter()
            summary = fill_matrix.run(config)
            res[label] = (time.perf_counter() - t0, summary)
            assert summary.cells_ok == len(tasks), summary
            assert summary.feature_misses == 0, summary

        # The plain loop: the same trials, features cached, rows written per cell.
        fill = fill_config(fresh_root(root, base, with_features=True), size, samples)
        storage = fill.storage()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        for task in tasks:
            unit = CellUnit(expert, (task,), size)
            outs = [train_unit(fill, unit, [c]).outcomes[0] for c in fill.configs()]
            write_rows(storage, [combine(outs, fill)])
        loop_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
        torch.set_num_threads(os.cpu_count() or 1)
    n_cells = len(tasks)
    rows = [{"measure": "plain loop, 1 call per (cell, config)", "trials": n_trials,
             "wall_s": loop_s, "trials_per_s": n_trials / loop_s, "cells_per_s": n_cells / loop_s,
             "wall_vs_loop": 1.0, "overhead_s_per_config": 0.0}]
    for label, (wall, summary) in res.items():
        trials = summary.trials_run
        rows.append({"measure": label, "trials": trials, "wall_s": wall,
                     "trials_per_s": trials / wall, "cells_per_s": n_cells / wall,
                     "wall_vs_loop": wall / loop_s,
                     "overhead_s_per_config": (wall - loop_s) / n_trials})
    return rows


def batched_vs_one_by_one(n_problems: int, n_configs: int, dim: int, n: int, classes: int,
                          epochs: int) -> dict:
    from t2v_core.matrix.finetune import ProbeRecipe, SearchSpace, fit_head, fit_heads, make_problem

    g = torch.Generator().manual_seed(0)
    problems = []
    for _ in range(n_problems):
        means = torch.randn(classes, dim, generator=g)
        y, yt = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (n // 2,), generator=g)
        problems.append(make_problem(means[y] + 2 * torch.randn(n, dim, generator=g), y,
                                     means[yt] + 2 * torch.randn(n // 2, dim, generator=g), yt,
                                     classes))
    configs = SearchSpace().sample(n_configs, 0)
    recipe = ProbeRecipe(epochs=epochs)
    t_batch, batched = timed(fit_heads, problems, configs, recipe)
    t_one, alone = timed(lambda: [[fit_head(p, c, recipe) for c in configs] for p in problems])
    diff = max(abs(a.train_loss - b.train_loss) for ra, rb in zip(batched, alone, strict=True)
               for a, b in zip(ra, rb, strict=True))
    heads = n_problems * n_configs
    return {"measure": f"{n_problems} cells × {n_configs} configs, D={dim}, N={n}, C={classes}, "
                       f"{epochs} Adam steps", "heads": heads, "batched_s": t_batch,
            "one_by_one_s": t_one, "speedup": t_one / t_batch,
            "batched_ms_per_head": 1e3 * t_batch / heads, "max_loss_diff": diff}


def resnet34_ms_per_image(batch: int, repeat: int) -> float:
    from t2v_core.embedding.probes import build_probe, extract_features

    net = build_probe("resnet34", seed=0).backbone
    x = torch.randn(batch, 3, 224, 224)
    extract_features(net, x[:2])  # warm-up
    t, _ = timed(extract_features, net, x, batch, repeat=repeat)
    return 1e3 * t / batch


def projection(cpu_ms: float, factor: float, images: int, head_s_per_cell: float,
               configs: int, epochs_ft: int) -> list[dict]:
    """GPU-hours for the 1,460 × 156 matrix. A backward pass costs about two forwards."""
    cells = N_TASKS * N_EXPERTS
    gpu_s = cpu_ms / factor / 1e3
    paper_per_cell = PAPER_GPU_HOURS / PAPER_CLASSIFIERS

    def row(name, gpu_h, cpu_h=0.0):
        per_cell = gpu_h / cells
        return {"recipe": name, "gpu_hours": gpu_h, "cpu_hours_heads": cpu_h,
                "gpu_s_per_cell": per_cell * 3600, "pct_of_paper_per_cell": 100 * per_cell / paper_per_cell}

    heads_cpu_h = cells * head_s_per_cell / 3600
    return [
        row(f"probe, features cached (1 forward/image/cell, {configs} heads on CPU)",
            cells * images * gpu_s / 3600, heads_cpu_h),
        row(f"probe, no cache ({configs} configs each re-extract features)",
            cells * images * configs * gpu_s / 3600, heads_cpu_h),
        row(f"finetune, {epochs_ft} epochs, 1 config (fwd+bwd ≈ 3 forwards)",
            cells * images * epochs_ft * 3 * gpu_s / 3600),
        row(f"paper: {PAPER_GPU_HOURS:.0f} GPU-h / {PAPER_CLASSIFIERS} classifiers, scaled",
            paper_per_cell * cells),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8, help="synthetic tasks")
    parser.add_argument("--size", type=int, default=32, help="image size of the synthetic tasks")
    parser.add_argument("--train-per-class", type=int, default=25)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="configurations per cell")
    parser.add_argument("--cpu-to-gpu", type=float, default=100.0,
                        help="assumed speed of one datacenter GPU (V100 class, fp32, large "
                             "batches) over one core of this CPU for a ResNet-34 forward")
    parser.add_argument("--images-per-task", type=int, default=1000,
                        help="assumed mean images (train+test) per task of the real zoo")
    parser.add_argument("--finetune-epochs", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "ray.tune", "jobs.fill_matrix", "t2v_core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="matrix-cost-") as tmp:
        base = Path(tmp)
        root, tasks, experts = write_zoo(base, args.tasks, args.size, args.train_per_class,
                                         args.test_per_class, args.classes)
        torch.set_num_threads(1)  # one CPU per trial, as in the job
        cells = per_cell_seconds(root, args.size, args.samples, experts[::2], tasks, base)
        warm_cache(root, args.size, tasks, experts[0])  # the expert of the Tune comparison
        tune_rows = tune_vs_loop(root, args.size, args.samples, tasks, experts[0], base)
    torch.set_num_threads(1)
    heads = batched_vs_one_by_one(n_problems=8, n_configs=args.samples, dim=512, n=200,
                                  classes=10, epochs=200)
    # One thread, best of several: on a shared machine a multi-threaded forward mostly
    # measures the other tenants (2 threads read 30 to 300 ms/image here, 1 thread 50 to 110).
    cpu_ms = resnet34_ms_per_image(batch=8, repeat=5)
    torch.set_num_threads(os.cpu_count() or 1)

    head_s = heads["batched_s"] / (heads["heads"] / args.samples)  # per cell, all its configs
    proj = projection(cpu_ms, args.cpu_to_gpu, args.images_per_task, head_s, args.samples,
                      args.finetune_epochs)
    assumptions = {
        "resnet34_cpu_ms_per_image_224px": cpu_ms,
        "resnet34_cpu_threads": 1,
        "cpu_to_gpu_factor": args.cpu_to_gpu,
        "implied_gpu_images_per_s": 1e3 * args.cpu_to_gpu / cpu_ms,
        "images_per_task": args.images_per_task,
        "head_cpu_s_per_cell": head_s,
        "cells": N_TASKS * N_EXPERTS,
        "load_average": os.getloadavg()[0],
        "seconds": time.perf_counter() - started,
    }
    report("matrix_cost_cells", cells, {})
    report("matrix_cost_tune", tune_rows, {})
    report("matrix_cost_heads", [heads], {})
    report("matrix_cost_projection", proj, {"assumptions": assumptions})
    for k, v in assumptions.items():
        log.info("%s: %s", k, f"{v:.4g}" if isinstance(v, float) else v)


if __name__ == "__main__":
    main()
