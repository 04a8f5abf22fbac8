"""Bad input gives a clear error naming what is wrong, loses nothing already stored, duplicates
nothing, and a re-run once the input is fixed completes."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import embed_tasks
from t2v_core.embedding.probes import SmallCNN, build_probe, save_weights
from t2v_core.embedding.store import read_embedding_rows
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import TaskRejectedError, scan_task
from t2v_core.zoo.manifest import (
    TASKS_MANIFEST,
    ExpertSpec,
    ManifestError,
    TaskSpec,
    read_tasks,
    upsert_tasks,
)
from t2v_core.zoo.register import register_folders

SIZE = 12
CLASSES = {"cat": 4, "dog": 4}


def _png(seed: int) -> bytes:
    pixels = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (SIZE, SIZE, 3), generator=pixels, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _parquet_task(folder: Path, labels: list[str]) -> None:
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        table = pa.table({"image": [_png(i) for i in range(len(labels))], "label": labels})
        pq.write_table(table, folder / f"{split}.parquet")


# -- names that would leave their folder ------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "..", "a\\b", ""])
def test_specs_refuse_names_that_are_paths(bad):
    fields = dict(family="f", data_uri="/d", format="imagefolder", n_train=2, n_test=2,
                  content_hash="h")
    with pytest.raises(ValueError, match="not a plain name"):
        TaskSpec(task_id=bad, classes=("a", "b"), **fields)
    with pytest.raises(ValueError, match=r"class .* not a plain name"):
        TaskSpec(task_id="t", classes=("a", bad), **fields)
    with pytest.raises(ValueError, match="expert id .* not a plain name"):
        ExpertSpec(expert_id=bad, arch="small_cnn", weights_uri="/w.pt", source_task_id=None,
                   content_hash="h")
    with pytest.raises(ValueError, match="source task id .* not a plain name"):
        ExpertSpec(expert_id="e", arch="small_cnn", weights_uri="/w.pt", source_task_id=bad,
                   content_hash="h")


def test_traversal_names_are_refused_at_registration_and_the_rest_registers(
        tmp_path, image_folder):
    tasks = tmp_path / "tasks"
    image_folder(tasks, "good", CLASSES, {"cat": 1, "dog": 1}, size=SIZE)
    _parquet_task(tasks / "labels_up", ["../x", "../x", "cat", "cat"])
    _parquet_task(tasks / "labels_abs", ["/etc/passwd", "/etc/passwd", "cat", "cat"])
    with pytest.raises(TaskRejectedError, match=r"task id '\.\./good' is not a plain name"):
        scan_task(str(tasks / "good"), task_id="../good")

    root = tmp_path / "root"
    report = register_folders(str(tasks), str(root))
    assert report.registered == ("good",)
    assert "class '../x' is not a plain name" in report.skipped["labels_up"]
    assert "class '/etc/passwd' is not a plain name" in report.skipped["labels_abs"]
    assert [t.task_id for t in read_tasks(root)] == ["good"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "tasks"]  # nothing outside

    manifest = (root / TASKS_MANIFEST).read_bytes()
    again = register_folders(str(tasks), str(root))
    assert again.upsert.unchanged == ("good",) and not again.upsert.changed
    assert (root / TASKS_MANIFEST).read_bytes() == manifest


# -- a manifest that is not what it should be -------------------------------------------------
def _good_row() -> dict:
    return {"task_id": "t1", "family": "f", "data_uri": "/d/t1", "format": "imagefolder",
            "classes": ["a", "b"], "n_classes": 2, "n_train": 4, "n_test": 2,
            "content_hash": "h1"}


@pytest.mark.parametrize(("change", "message"), [
    ({"n_train": ["many"]}, r"column 'n_train' holds string, not int32"),
    ({"content_hash": None}, r"required column 'content_hash' is missing"),
    ({"task_id": [None]}, r"column 'task_id' has 1 empty value"),
    ({"task_id": ["../up"]}, r"task id '\.\./up' is not a plain name"),
    ({"format": ["zip"]}, r"unknown format 'zip'"),
])
def test_manifest_with_a_wrong_schema_names_file_and_column(tmp_path, image_folder, change,
                                                            message):
    columns = {k: [v] for k, v in _good_row().items()}
    for name, values in change.items():
        if values is None:
            del columns[name]
        else:
            columns[name] = values
    root = StorageRoot(tmp_path / "root")
    root.write_table_atomic(TASKS_MANIFEST, pa.table(columns))
    stored = (tmp_path / "root" / TASKS_MANIFEST).read_bytes()
    where = str(tmp_path / "root" / TASKS_MANIFEST)
    with pytest.raises(ManifestError, match=message) as err:
        read_tasks(root)
    assert where in str(err.value)

    # Registering into it fails the same way and leaves the file as it was.
    image_folder(tmp_path / "tasks", "t2", CLASSES, {"cat": 1, "dog": 1}, size=SIZE)
    with pytest.raises(ManifestError, match=message):
        register_folders(str(tmp_path / "tasks"), root)
    assert (tmp_path / "root" / TASKS_MANIFEST).read_bytes() == stored

    # Once the file is repaired, the same command completes.
    root.write_table_atomic(TASKS_MANIFEST, pa.table({k: [v] for k, v in _good_row().items()}))
    assert register_folders(str(tmp_path / "tasks"), root).registered == ("t2",)
    assert [t.task_id for t in read_tasks(root)] == ["t1", "t2"]


def test_manifest_that_is_not_parquet_names_the_file(tmp_path):
    root = StorageRoot(tmp_path)
    root.write_bytes_atomic(TASKS_MANIFEST, b"task_id,family\nt1,f\n")
    with pytest.raises(ManifestError, match=r"tasks\.parquet is not a readable Parquet file"):
        read_tasks(root)
    with pytest.raises(ManifestError):
        upsert_tasks(root, [])
    assert (tmp_path / TASKS_MANIFEST).read_bytes() == b"task_id,family\nt1,f\n"


# -- weights of another architecture -----------------------------------------------------------
@pytest.mark.slow
def test_weights_of_another_architecture_fail_the_job_clearly_and_write_nothing(
        ray_local, tmp_path, image_folder, caplog):
    for i, name in enumerate(["ant", "bee"]):
        image_folder(tmp_path / "tasks", name, CLASSES, {"cat": 1, "dog": 1}, seed=i, size=SIZE)
    root = str(tmp_path / "root")
    register_folders(str(tmp_path / "tasks"), root)
    wrong = str(tmp_path / "resnet18.pt")
    save_weights(build_probe("resnet18").backbone, wrong)
    args = ["--root", root, "--probe", "small_cnn", "--image-size", str(SIZE), "--no-progress",
            "--weights"]

    with caplog.at_level(logging.ERROR, logger="jobs.embed_tasks"):
        assert embed_tasks.main([*args, wrong]) == 1
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"weights {wrong} do not match the architecture" in message
    assert "missing keys: features.0.weight" in message
    assert "unexpected keys: bn1.bias" in message
    assert sorted(p.name for p in Path(root).iterdir()) == ["zoo"]  # nothing written

    right = str(tmp_path / "small_cnn.pt")
    save_weights(SmallCNN(), right)
    first = embed_tasks.run(embed_tasks.parse_args([*args, right]))
    assert sorted(first.done) == ["ant", "bee"] and not first.failed
    second = embed_tasks.run(embed_tasks.parse_args([*args, right]))
    assert second.done == [] and sorted(second.up_to_date) == ["ant", "bee"]
    probe_id = build_probe("small_cnn", right).probe_id
    ids = read_embedding_rows(StorageRoot(root), probe_id, "montecarlo").column("task_id")
    assert sorted(ids.to_pylist()) == ["ant", "bee"]
