"""A task of 50,000 tiny images is registered and embedded in bounded memory: registration
hashes and checks the files in streamed batches and the data reader loads only the
``--max-per-class`` subset, so the peak RSS grows no more for 50,000 images than for 500 (up
to the listing of the file names). Each case runs in a fresh process whose peak RSS
(``VmHWM``) is reset once the probe is built, so that the peak measured is the work's own.
The large task ends with one manifest row and one embedding row, and re-runs that have
nothing left to do."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image, PngImagePlugin

from t2v_core.zoo.manifest import read_tasks

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32  # the probe's input: 50,000 decoded images would be 600 MB of float32
MAX_PER_CLASS = 20
PAD_BYTES = 2048  # every file ~2 KB: all 50,000 held at once would be ~100 MB
MIB = 1024**2
log = logging.getLogger(__name__)

_CASE = """
import json, sys
import torch
torch.set_num_threads(1)
from t2v_core.embedding.fisher import filter_names
from t2v_core.embedding.probes import build_probe
from t2v_core.embedding.store import EmbedConfig, EmbeddingWriter, plan_embeddings, run_task
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import read_tasks
from t2v_core.zoo.register import register_folders

phase, tasks, root = sys.argv[1:4]
size, cap = int(sys.argv[4]), int(sys.argv[5])
probe = build_probe("small_cnn", seed=0, input_size=size)
config = EmbedConfig(image_size=size, max_per_class=cap).resolved(probe)
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS: imports do not count
before = status_kib("VmRSS")
if phase == "register":
    report = register_folders(tasks, root)
    out = {"registered": list(report.registered), "unchanged": list(report.upsert.unchanged)}
else:
    store = StorageRoot(root)
    plan = plan_embeddings(store, read_tasks(store), probe.probe_id, "montecarlo", config=config)
    writer = EmbeddingWriter(store, probe.probe_id, "montecarlo", filter_names(probe.backbone),
                             config=config)
    for spec in plan.todo:
        writer.add(run_task(spec, probe, config))
    writer.flush()
    out = {"done": writer.summary.done, "failed": list(writer.summary.failed),
           "up_to_date": list(plan.up_to_date)}
out["growth"] = (status_kib("VmHWM") - before) * 1024
print(json.dumps(out))
"""


def _pngs(seed: int, n: int) -> list[bytes]:
    """``n`` distinct 8x8 PNGs, each padded with a text chunk to about ``PAD_BYTES``."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        info = PngImagePlugin.PngInfo()
        info.add_text("pad", "x" * PAD_BYTES)  # tEXt: stored as is
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            buf, format="PNG", pnginfo=info)
        blobs.append(buf.getvalue())
    return blobs


def _write_task(folder: Path, n_train_per_class: int) -> int:
    """Two classes of ``n_train_per_class`` training and 10 test images; returns the count."""
    total = 0
    for c, cls in enumerate(("cat", "dog")):
        blobs = _pngs(c, 16)
        for split, n in (("train", n_train_per_class), ("test", 10)):
            where = folder / split / cls
            where.mkdir(parents=True)
            for i in range(n):
                (where / f"{i:05d}.png").write_bytes(blobs[i % len(blobs)])
            total += n
    return total


def _case(phase: str, tasks: Path, root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _CASE, phase, str(tasks), str(root),
                           str(IMAGE_SIZE), str(MAX_PER_CLASS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _embedding_keys(root: Path) -> list[str]:
    table = ds.dataset(root / "embeddings", format="parquet", partitioning="hive").to_table(
        columns=["task_id"])
    return sorted(table.column("task_id").to_pylist())


@pytest.mark.slow
def test_50k_image_task_registers_and_embeds_in_the_memory_of_a_500_image_one(tmp_path):
    sizes = {"small": 240, "large": 24_990}
    growth: dict[tuple[str, str], int] = {}
    for name, per_class in sizes.items():
        tasks = tmp_path / name / "tasks"
        n = _write_task(tasks / name, per_class)
        assert n == {"small": 500, "large": 50_000}[name]
        root = tmp_path / name / "root"

        first = _case("register", tasks, root)
        assert first["registered"] == [name]
        growth["register", name] = first["growth"]
        embedded = _case("embed", tasks, root)
        assert embedded["done"] == [name] and not embedded["failed"]
        growth["embed", name] = embedded["growth"]

    # one row each, and a re-run of the large task has nothing left to do
    tasks, root = tmp_path / "large" / "tasks", tmp_path / "large" / "root"
    assert [(t.task_id, t.n_train, t.n_test) for t in read_tasks(root)] == [
        ("large", 49_980, 20)]
    again = _case("embed", tasks, root)
    assert again["done"] == [] and again["up_to_date"] == ["large"]
    assert _embedding_keys(root) == ["large"]

    shown = {f"{p}/{n}": round(v / MIB, 1) for (p, n), v in growth.items()}
    log.info("peak RSS growth in MiB: %s", shown)
    for phase in ("register", "embed"):
        extra = growth[phase, "large"] - growth[phase, "small"]
        # 100x the files may cost their names (about 10 MiB measured), never their contents
        # (~110 MiB of files; loaded whole, the embedding grew by 1.3 GiB instead of 0.1)
        assert extra < 40 * MIB, f"{phase}: peak RSS growth in MiB {shown}"
