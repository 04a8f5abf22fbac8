"""Throughput of the embedding job with 1 and 2 Ray workers, its per-task overhead over a plain
library loop, and what that means for a 1,460-task zoo on N GPUs.

All runs embed the same synthetic zoo (local ImageFolder tasks, local storage root):

* loop:  ``run_task`` called task after task in this process, one torch thread (like a worker
  with ``--num-cpus 1``), probe already built and warmed up;
* ray-W: ``jobs.embed_tasks.run`` on a local Ray with W one-CPU workers. "cold" is the first
  run on a fresh Ray (worker processes start and import torch); "warm" is a second run with
  another probe seed (so every task is recomputed) on the same, already started workers.

    python -m benchmarks.embed_scaling [--tasks 24] [--classes 4] [--per-class 24] [--size 32]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from benchmarks.common import report, timed
from jobs import embed_tasks
from t2v_core.embedding.fisher import filter_names
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, EmbeddingWriter, run_task
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks
from t2v_core.zoo.register import register_folders

log = logging.getLogger("benchmarks.embed_scaling")
PAPER_TASKS = 1460


def make_zoo(base: Path, n_tasks: int, n_classes: int, per_class: int, size: int) -> str:
    """Random-pixel ImageFolder tasks registered under ``base/root``; returns the root."""
    rng = np.random.default_rng(0)
    for t in range(n_tasks):
        for split, count in (("train", per_class), ("test", 1)):
            for c in range(n_classes):
                folder = base / "tasks" / f"task{t:03d}" / split / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")
    root = str(base / "root")
    register_folders(str(base / "tasks"), root)
    return root


def loop_seconds(root: str, probe_name: str, size: int) -> float:
    """Wall time of embedding every task in a plain loop (after one warm-up task)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = build_probe(probe_name, seed=0, input_size=size)
        config = EmbedConfig(image_size=size).resolved(probe)
        tasks = read_tasks(root)
        run_task(tasks[0], probe, config)  # warm-up: first-call costs are not per task
        seconds, outcomes = timed(lambda: [run_task(s, probe, config) for s in tasks], repeat=2)
    finally:
        torch.set_num_threads(threads)
    assert all(o.ok for o in outcomes)
    return seconds


def write_seconds_per_task(root: str, probe_name: str, n_tasks: int, batch: int) -> float:
    """Driver-side cost of writing one embedding (Parquet part per ``batch`` tasks)."""
    from t2v_core.embedding.store import TaskOutcome

    probe = build_probe(probe_name, seed=0)
    names = filter_names(probe.backbone)
    writer = EmbeddingWriter(StorageRoot(root), "bench-write", "montecarlo", names,
                             batch_size=batch)
    vec = np.ones(len(names), np.float32)
    seconds, _ = timed(lambda: ([writer.add(TaskOutcome(f"t{i}", "h", vec, 10))
                                 for i in range(n_tasks)], writer.flush()))
    return seconds / n_tasks


def ray_seconds(root: str, probe_name: str, size: int, workers: int, batch: int) -> tuple:
    """(cold, warm) wall seconds of the job on a fresh local Ray with ``workers`` CPUs; warm is
    the best of two runs."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        times = []
        for seed in (100 + workers, 200 + workers, 300 + workers):  # new probe id: all recomputed
            args = embed_tasks.parse_args([
                "--root", root, "--probe", probe_name, "--image-size", str(size),
                "--seed", str(seed), "--batch", str(batch), "--no-progress", "--num-cpus", "1",
            ])
            seconds, summary = timed(embed_tasks.run, args)
            assert not summary.failed, summary.failed
            times.append(seconds)
        return times[0], min(times[1:])
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=24, help="training images per class")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--probe", default="small_cnn")
    parser.add_argument("--batch", type=int, default=8, help="embeddings per written part")
    parser.add_argument("--gpus", default="1,8,16,32,64,128",
                        help="GPU counts of the extrapolation table")
    parser.add_argument("--task-seconds", type=float, default=None,
                        help="per-task compute time to extrapolate from instead of the one "
                        "measured here (e.g. ResNet-34 on one GPU, measured on that GPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_zoo(Path(tmp), args.tasks, args.classes, args.per_class, args.size)
        n = args.tasks
        t_loop = loop_seconds(root, args.probe, args.size)
        t_write = write_seconds_per_task(root, args.probe, n, args.batch)
        ray1 = ray_seconds(root, args.probe, args.size, 1, args.batch)
        ray2 = ray_seconds(root, args.probe, args.size, 2, args.batch)

    rows = [
        {"run": "library loop (1 thread)", "workers": 1, "seconds": t_loop,
         "s_per_task": t_loop / n, "emb_per_min": 60 * n / t_loop},
    ]
    for workers, (cold, warm) in ((1, ray1), (2, ray2)):
        for kind, sec in (("cold", cold), ("warm", warm)):
            rows.append({"run": f"ray job, {kind}", "workers": workers, "seconds": sec,
                         "s_per_task": sec / n, "emb_per_min": 60 * n / sec})
    overhead = (ray1[1] - t_loop) / n
    ratio = ray1[1] / t_loop
    startup = ray1[0] - ray1[1]
    speedup_2 = ray1[1] / ray2[1]
    load = (load_before, os.getloadavg()[0])
    print()
    print(f"1-min load average before/after: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} "
          "CPUs (other work on the machine inflates every number below)")
    print(f"per-task overhead of the Ray fan-out (1 worker, warm): {overhead * 1e3:.0f} ms "
          f"= {ratio:.2f}x the library loop; worker start-up (cold - warm): {startup:.1f} s; "
          f"2 workers vs 1: {speedup_2:.2f}x; driver write: {t_write * 1e3:.1f} ms/task")

    compute = args.task_seconds if args.task_seconds is not None else t_loop / n
    per_task = compute + max(overhead, 0.0)
    table = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        waves = math.ceil(PAPER_TASKS / gpus)
        hours = (waves * per_task + startup) / 3600
        table.append({"gpus": gpus, "tasks": PAPER_TASKS, "tasks_per_gpu": waves,
                      "s_per_task": per_task, "hours": hours,
                      "emb_per_min": 60 * PAPER_TASKS / (hours * 3600)})
    print()
    report("embed_scaling", rows + [{"run": f"extrapolated, {r['gpus']} GPU(s)",
                                     "workers": r["gpus"], "seconds": r["hours"] * 3600,
                                     "s_per_task": r["s_per_task"],
                                     "emb_per_min": r["emb_per_min"]} for r in table],
           {"config": vars(args), "overhead_s_per_task": overhead, "ray_over_loop": ratio,
            "worker_startup_s": startup, "two_vs_one_worker": speedup_2,
            "write_s_per_task": t_write, "extrapolation": table, "load_average": load,
            "assumptions": [
                "one task per GPU at a time, tasks independent: time = ceil(1460/N) x "
                "per-task time + one worker start-up",
                "per-task time = compute (measured library loop, or --task-seconds) + the "
                "Ray overhead measured with one local worker",
                "storage reads and the driver's writes keep up (write cost reported above)",
                "the compute measured here is the synthetic zoo with this probe on one CPU "
                "thread of this machine; a ResNet-34 zoo on GPUs needs --task-seconds from "
                "a measurement on that GPU",
            ]})


if __name__ == "__main__":
    main()
