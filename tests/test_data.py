"""Scanning and loading image tasks: validation, hashing, decoding, deterministic sampling."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from t2v_core.zoo.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    TaskRejectedError,
    UnreadableURIError,
    decode_image,
    load_split,
    scan_task,
)


def _png_bytes(color, mode="RGB", size=8) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_jpeg() -> bytes:
    """A JPEG whose header parses (``verify`` passes) but whose pixel data is cut short."""
    data = _jpeg_bytes()
    return data[: len(data) * 7 // 10]


def _jpeg_bytes(size=32) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_scan_imagefolder(tmp_path, image_folder):
    task = image_folder(tmp_path, "cub__gulls", {"b": 3, "a": 2}, {"a": 1, "b": 2})
    spec, problems = scan_task(str(task))
    assert problems == []
    assert (spec.task_id, spec.family, spec.format) == ("cub__gulls", "cub", "imagefolder")
    assert spec.classes == ("a", "b") and (spec.n_train, spec.n_test) == (5, 3)
    assert spec.data_uri == str(task) and len(spec.content_hash) == 64
    assert scan_task(str(task))[0] == spec  # hashing is stable


def test_family_file_and_parent(tmp_path, image_folder):
    task = image_folder(tmp_path / "birds", "gulls-2", {"a": 1, "b": 1}, {"a": 1})
    assert scan_task(str(task))[0].family == "gulls"
    assert scan_task(str(task), family_from="parent")[0].family == "birds"
    (task / "family.txt").write_text("seabirds\n")
    assert scan_task(str(task))[0].family == "seabirds"


def test_corrupt_and_truncated_images_are_reported_and_skipped(tmp_path, image_folder):
    task = image_folder(tmp_path, "t", {"a": 2, "b": 2}, {"a": 1, "b": 1})
    (task / "train" / "a" / "garbage.png").write_bytes(b"not an image at all")
    (task / "train" / "b" / "cut.jpg").write_bytes(_truncated_jpeg())
    (task / "test" / "a" / "notes.txt").write_text("hello")
    shutil.copy(task / "train" / "a" / "0.png", task / "train" / "a" / "odd[1]*.png")
    spec, problems = scan_task(str(task))
    assert (spec.n_train, spec.n_test) == (5, 2)
    by_kind = {(p.kind, p.path) for p in problems}
    assert ("corrupt_image", "train/a/garbage.png") in by_kind
    assert ("corrupt_image", "train/b/cut.jpg") in by_kind
    assert ("not_an_image", "test/a/notes.txt") in by_kind
    # Loading skips them too, instead of failing half-way.
    x, y = load_split(spec, "train", 8)
    assert x.shape == (5, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1]
    # A corrupt file drawn into a subsample is replaced by the next one in the seeded order.
    for seed in range(4):
        assert load_split(spec, "train", 8, max_per_class=3, seed=seed)[1].tolist() == [
            0,
            0,
            0,
            1,
            1,
        ]


def test_decode_image_names_the_file():
    with pytest.raises(CorruptImageError, match="s3://b/t/train/a/x.jpg") as err:
        decode_image(_truncated_jpeg(), "s3://b/t/train/a/x.jpg")
    assert err.value.path == "s3://b/t/train/a/x.jpg"
    assert isinstance(err.value, ValueError)


def test_empty_class_is_left_out(tmp_path, image_folder):
    task = image_folder(tmp_path, "t", {"a": 1, "b": 1, "c": 0}, {"a": 1, "c": 1})
    spec, problems = scan_task(str(task))
    assert spec.classes == ("a", "b") and spec.n_test == 1
    kinds = {(p.kind, p.path) for p in problems}
    assert ("empty_class", "c") in kinds and ("unknown_test_class", "c") in kinds


@pytest.mark.parametrize(
    ("train", "test", "reason"),
    [
        ({"a": 2}, {"a": 1}, "at least 2 classes"),
        ({"a": 1, "b": 1}, None, "no test split"),
        ({"a": 1, "b": 1}, {"z": 1}, "test split has no valid image"),
    ],
)
def test_rejected_tasks_name_task_and_reason(tmp_path, image_folder, train, test, reason):
    task = image_folder(tmp_path, "bad-task", train, test)
    with pytest.raises(TaskRejectedError, match=reason) as err:
        scan_task(str(task))
    assert err.value.task_id == "bad-task" and "bad-task" in str(err.value)


def test_unreadable_uri(tmp_path):
    with pytest.raises(UnreadableURIError, match=str(tmp_path / "missing")):
        scan_task(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskRejectedError, match="no training split"):
        scan_task(str(tmp_path / "empty"))


def test_load_split_normalises_and_converts_grayscale(tmp_path):
    task = tmp_path / "colors"
    for split in ("train", "test"):
        (task / split / "red").mkdir(parents=True)
        (task / split / "gray").mkdir(parents=True)
        (task / split / "red" / "0.png").write_bytes(_png_bytes((255, 0, 0), size=10))
        (task / split / "gray" / "0.png").write_bytes(_png_bytes(128, mode="L", size=6))
    spec, _ = scan_task(str(task))
    x, y = load_split(spec, "test", 4)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (2, 3, 4, 4)
    assert spec.classes == ("gray", "red") and y.tolist() == [0, 1]
    gray = (128 / 255 - IMAGENET_MEAN) / IMAGENET_STD
    red = (np.array([1.0, 0.0, 0.0], dtype=np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(x[0].mean(dim=(1, 2)).numpy(), gray, rtol=1e-5)
    np.testing.assert_allclose(x[1].mean(dim=(1, 2)).numpy(), red, rtol=1e-5)
    with pytest.raises(ValueError, match="split"):
        load_split(spec, "val", 4)


def test_subsampling_is_deterministic(tmp_path, image_folder):
    task = image_folder(tmp_path, "many", {"a": 12, "b": 12}, {"a": 1, "b": 1}, size=4)
    spec, _ = scan_task(str(task))
    x0, y0 = load_split(spec, "train", 4, max_per_class=4, seed=0)
    x0b, _ = load_split(spec, "train", 4, max_per_class=4, seed=0)
    x1, y1 = load_split(spec, "train", 4, max_per_class=4, seed=1)
    assert x0.shape == (8, 3, 4, 4) and y0.tolist() == [0] * 4 + [1] * 4 == y1.tolist()
    assert torch.equal(x0, x0b)
    assert not torch.equal(x0, x1)
    full, _ = load_split(spec, "train", 4)
    assert full.shape[0] == 24
    # Every sampled image is one of the task's images.
    flat = {tuple(r.flatten().tolist()) for r in full}
    assert all(tuple(r.flatten().tolist()) in flat for r in x1)


def _write_parquet_task(task_dir, rows_train, rows_test):
    task_dir.mkdir(parents=True)
    for name, rows in (("train", rows_train), ("test", rows_test)):
        table = pa.table(
            {"image": pa.array([r[0] for r in rows], pa.binary()), "label": [r[1] for r in rows]}
        )
        pq.write_table(table, task_dir / f"{name}.parquet")


def test_parquet_task(tmp_path):
    red, blue = _png_bytes((255, 0, 0)), _png_bytes((0, 0, 255))
    task = tmp_path / "pq__colors"
    _write_parquet_task(
        task,
        [(red, "red"), (blue, "blue"), (b"junk", "blue"), (red, "red")],
        [(red, "red"), (blue, "blue")],
    )
    spec, problems = scan_task(str(task))
    assert spec.format == "parquet" and spec.family == "pq"
    assert spec.classes == ("blue", "red") and (spec.n_train, spec.n_test) == (3, 2)
    assert [(p.kind, p.path) for p in problems] == [("corrupt_image", "train.parquet#2")]
    x, y = load_split(spec, "train", 8)
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 1]


def test_parquet_missing_column_rejected(tmp_path):
    task = tmp_path / "p"
    task.mkdir()
    for name in ("train", "test"):
        pq.write_table(pa.table({"img": [b"x"], "label": ["a"]}), task / f"{name}.parquet")
    with pytest.raises(TaskRejectedError, match="lacks column"):
        scan_task(str(task))
