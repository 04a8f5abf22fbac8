"""The embedding driver SIGKILLed half-way (``python -m jobs.embed_tasks``, its local Ray with
it): the parts written before the kill stay, each once; the re-run embeds only the tasks
without one, and leaves one row per key on disk."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pytest

from jobs import embed_tasks
from t2v_core.zoo.register import register_folders

REPO = Path(__file__).resolve().parents[2]
SIZE = 24
NAMES = [f"k{i:02d}" for i in range(8)]


def _raw_task_ids(root: Path) -> list[str]:
    """task_id of every embedding row on disk, as any Parquet reader sees the folder."""
    if not (root / "embeddings").exists():
        return []
    table = ds.dataset(root / "embeddings", format="parquet", partitioning="hive").to_table(
        columns=["task_id"])
    return sorted(table.column("task_id").to_pylist())


def _parts(root: Path) -> int:
    return sum(1 for _ in (root / "embeddings").rglob("part-*.parquet"))


@pytest.mark.slow
def test_embedding_driver_killed_half_way_resumes_with_each_task_once(
        ray_local, tmp_path, image_folder):
    for i, name in enumerate(NAMES):  # big enough that 8 tasks in a row take seconds
        image_folder(tmp_path / "tasks", name, {"a": 20, "b": 20}, {"a": 1, "b": 1}, seed=i,
                     size=SIZE)
    root = tmp_path / "root"
    register_folders(str(tmp_path / "tasks"), str(root))
    args = ["--root", str(root), "--probe", "small_cnn", "--image-size", str(SIZE),
            "--no-progress", "--no-tracking", "--batch", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    job = subprocess.Popen([sys.executable, "-m", "jobs.embed_tasks", *args, "--local-cpus", "1"],
                           cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while job.poll() is None and time.monotonic() < deadline:
            if (root / "embeddings").exists() and _parts(root) >= 2:
                break
            time.sleep(0.1)
        assert job.poll() is None, f"finished before the kill: {job.stderr.read()[-2000:]}"
    finally:
        ray_procs = psutil.Process(job.pid).children(recursive=True)
        os.killpg(job.pid, signal.SIGKILL)  # the driver, then the Ray it started
        for proc in ray_procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        job.wait(timeout=60)
        psutil.wait_procs(ray_procs, timeout=30)
    landed = _raw_task_ids(root)
    assert 2 <= len(landed) < len(NAMES) and len(set(landed)) == len(landed), landed

    summary = embed_tasks.run(embed_tasks.parse_args(args))
    assert sorted(summary.up_to_date) == landed  # what was written is not embedded again
    assert sorted(summary.done) == sorted(set(NAMES) - set(landed)) and not summary.failed
    assert _raw_task_ids(root) == NAMES  # one row per key
