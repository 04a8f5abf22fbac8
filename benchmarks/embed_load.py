"""Load test of the embedding job: a synthetic zoo of many small tasks embedded in steps (100,
then up to 250, then up to 500 tasks by default), with throughput and peak memory per step.

Each step registers the new task folders and runs ``jobs.embed_tasks.run`` on one local Ray
that stays up between steps; the job is resumable, so a step embeds only the tasks added since
the previous one. A sampler thread records, every ``--sample-s``, the resident memory (RSS) of
the driver and of every Ray worker process. The checks: time per embedded task does not grow
with the zoo (linear total time) and peak RSS stays flat from the first step to the last.

    python -m benchmarks.embed_load [--steps 100,250,500] [--classes 2] [--per-class 4]

Writes ``results/embed_load.json`` and ``results/embed_load.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import ray
from PIL import Image

from benchmarks.common import RESULTS, report
from jobs import embed_tasks
from jobs._ray_util import init_ray
from t2v_core.zoo.register import register_folders

log = logging.getLogger("benchmarks.embed_load")
MIB = 1024**2
# The checks: seconds per embedded task of the last step within this factor of the first
# warm step's, and peak RSS of the last step within this factor (+ slack) of the first's.
TIME_RATIO_MAX = 1.5
RSS_RATIO_MAX = 1.25
RSS_SLACK_MIB = 64


def write_tasks(base: Path, first: int, last: int, n_classes: int, per_class: int,
                size: int) -> None:
    """Random-pixel ImageFolder tasks ``task<first>`` .. ``task<last - 1>`` under ``base``."""
    for t in range(first, last):
        rng = np.random.default_rng(t)
        for split, count in (("train", per_class), ("test", 1)):
            for c in range(n_classes):
                folder = base / f"task{t:04d}" / split / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{i}.png")


def _is_ray_worker(proc: psutil.Process) -> bool:
    """A worker names itself ``ray::IDLE`` or ``ray::<task>`` once started."""
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return cmdline.startswith("ray::") or "default_worker.py" in cmdline


@dataclass
class RssSampler:
    """Peak RSS of this process and of the Ray workers under it, sampled on a thread."""

    every_s: float
    driver_peak: int = 0
    worker_peak: int = 0  # the largest single worker
    workers_total_peak: int = 0  # all workers together
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        me = psutil.Process()
        self.driver_peak = max(self.driver_peak, me.memory_info().rss)
        sizes = []
        for child in me.children(recursive=True):
            if _is_ray_worker(child):
                try:
                    sizes.append(child.memory_info().rss)
                except psutil.NoSuchProcess:
                    continue
        if sizes:
            self.worker_peak = max(self.worker_peak, max(sizes))
            self.workers_total_peak = max(self.workers_total_peak, sum(sizes))

    def __enter__(self) -> RssSampler:
        def loop() -> None:
            while not self._stop.wait(self.every_s):
                self.sample()

        self.sample()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def embed_step(root: str, args: argparse.Namespace, *extra: str) -> tuple[float, object]:
    config = embed_tasks.parse_args([
        "--root", root, "--probe", args.probe, "--image-size", str(args.size),
        "--batch", str(args.batch), "--no-progress", "--no-tracking", *extra])
    start = time.perf_counter()
    summary = embed_tasks.run(config)
    return time.perf_counter() - start, summary


def run_steps(base: Path, args: argparse.Namespace, steps: list[int]) -> list[dict]:
    tasks, root = base / "tasks", str(base / "root")
    rows, have = [], 0
    for step, total in enumerate(steps):
        start = time.perf_counter()
        write_tasks(tasks, have, total, args.classes, args.per_class, args.size)
        written = time.perf_counter() - start
        start = time.perf_counter()
        registered = register_folders(str(tasks), root).upsert.added
        reg_s = time.perf_counter() - start
        assert len(registered) == total - have, (len(registered), total, have)
        if step == 0:  # warm the workers up on a few tasks with another probe (own rows)
            embed_step(root, args, "--seed", "1", "--tasks", "task000*")
        with RssSampler(args.sample_s) as rss:
            seconds, summary = embed_step(root, args)
        assert not summary.failed, summary.failed
        assert len(summary.done) == total - have and len(summary.up_to_date) == have, summary
        rows.append({"tasks": total, "new_tasks": total - have, "embed_s": seconds,
                     "s_per_task": seconds / (total - have),
                     "tasks_per_s": (total - have) / seconds, "register_s": reg_s,
                     "write_images_s": written,
                     "driver_peak_mib": rss.driver_peak / MIB,
                     "worker_peak_mib": rss.worker_peak / MIB,
                     "workers_total_peak_mib": rss.workers_total_peak / MIB})
        log.info("%d tasks: %d new in %.1fs (%.2f tasks/s), driver %.0f MiB, workers %.0f MiB",
                 total, total - have, seconds, rows[-1]["tasks_per_s"],
                 rows[-1]["driver_peak_mib"], rows[-1]["workers_total_peak_mib"])
        have = total
    return rows


def checks(rows: list[dict]) -> dict:
    first, last = rows[0], rows[-1]
    time_ratio = last["s_per_task"] / first["s_per_task"]
    out = {"time_per_task_last_over_first": time_ratio,
           "time_linear": time_ratio <= TIME_RATIO_MAX}
    for name in ("driver_peak_mib", "workers_total_peak_mib"):
        bound = first[name] * RSS_RATIO_MAX + RSS_SLACK_MIB
        out[f"{name}_last_over_first"] = last[name] / first[name]
        out[f"{name}_flat"] = last[name] <= bound
    return out


def markdown(rows: list[dict], result: dict) -> str:
    cfg, load, chk = result["config"], result["load_average"], result["checks"]
    lines = [
        "# Embedding job under load",
        "",
        f"Synthetic zoo: tasks of {cfg['classes']} classes x {cfg['per_class']} training "
        f"images ({cfg['size']}x{cfg['size']} px), probe `{cfg['probe']}`, local Ray with "
        f"{cfg['cpus']} CPUs, embedded in steps (each step embeds only the new tasks).",
        f"Machine: {os.cpu_count()} CPUs, 1-min load average {load[0]:.1f} before and "
        f"{load[1]:.1f} after (other work shares the CPUs; compare ratios, not seconds).",
        "",
        "| tasks | new | embed s | tasks/s | s/task | driver peak MiB | largest worker MiB "
        "| all workers MiB | register s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['tasks']} | {r['new_tasks']} | {r['embed_s']:.1f} | "
              f"{r['tasks_per_s']:.2f} | {r['s_per_task']:.3f} | {r['driver_peak_mib']:.0f} | "
              f"{r['worker_peak_mib']:.0f} | {r['workers_total_peak_mib']:.0f} | "
              f"{r['register_s']:.1f} |" for r in rows]
    lines += [
        "",
        f"- time per task, last step / first: {chk['time_per_task_last_over_first']:.2f} "
        f"(linear if <= {TIME_RATIO_MAX}): {'pass' if chk['time_linear'] else 'FAIL'}",
        f"- driver peak RSS, last / first: {chk['driver_peak_mib_last_over_first']:.2f}: "
        f"{'pass' if chk['driver_peak_mib_flat'] else 'FAIL'}",
        f"- all workers' peak RSS, last / first: "
        f"{chk['workers_total_peak_mib_last_over_first']:.2f}: "
        f"{'pass' if chk['workers_total_peak_mib_flat'] else 'FAIL'}",
        f"  (flat if <= {RSS_RATIO_MAX} x first + {RSS_SLACK_MIB} MiB)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="100,250,500", help="zoo sizes, ascending")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=4, help="training images per class")
    parser.add_argument("--size", type=int, default=12, help="image side in pixels")
    parser.add_argument("--probe", default="small_cnn")
    parser.add_argument("--batch", type=int, default=16, help="embeddings per written part")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    load_before = os.getloadavg()
    started = time.perf_counter()
    init_ray(None, local_cpus=args.cpus)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_steps(Path(tmp), args, steps)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()
    result = {"config": vars(args), "load_average": [load_before[0], load_after[0]],
              "load_average_1_5_15_before": load_before,
              "load_average_1_5_15_after": load_after,
              "cpus": os.cpu_count(), "wall_s": time.perf_counter() - started,
              "checks": checks(rows)}
    report("embed_load", rows, result)
    (RESULTS / "embed_load.md").write_text(markdown(rows, result))
    ok = all(v for k, v in result["checks"].items() if isinstance(v, bool))
    print(f"checks {'passed' if ok else 'FAILED'}: {result['checks']}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
