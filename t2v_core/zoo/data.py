"""Image classification tasks read through fsspec (local paths and ``s3://``).

Two on-disk formats are understood:

* ``imagefolder``: ``<task>/{train,test}/<class>/<image>``;
* ``parquet``: ``<task>/train.parquet`` and ``<task>/test.parquet`` with columns ``image``
  (encoded image bytes) and ``label`` (class name).

:func:`scan_task` validates a task and describes it as a :class:`~t2v_core.zoo.manifest.TaskSpec`.
It decodes every image, so a bad file is found at registration rather than half-way through
a cluster job, and it *reports* what it leaves out (:class:`Problem`) instead of dropping it
silently:

* a corrupt or truncated image is skipped and reported with its path;
* a class with no valid training image is reported and kept out of ``classes``;
* test images of a class that is not in ``classes`` are reported and not counted;
* a task with fewer than two classes, without a test split (or whose test split has no valid
  image), or without a training split is rejected with :class:`TaskRejectedError`. A task
  without test data could never get a test error in the performance matrix, so it is not
  registered at all rather than registered with ``n_test=0``.

The family of a task is read from an optional ``family.txt`` in the task folder; without it
it is the task name up to the first ``__`` or ``-`` (``family_from="name-prefix"``), or the
name of the folder that holds the task (``family_from="parent"``).

``content_hash`` is a sha256 over the sorted (relative path, sha256 of the file) pairs of the
split files (for the Parquet format, the two Parquet files), so changing one image changes
only its task's hash, and the same tree gives the same hash on local disk and on S3.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from t2v_core.storage import filesystem_for, is_local, redact_uri
from t2v_core.zoo.manifest import TaskSpec, check_plain_name

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
)
SPLITS = ("train", "test")
FORMATS = ("imagefolder", "parquet")
_FETCH_BATCH = 64  # files fetched per request batch (s3fs fetches a batch concurrently)


class DataError(ValueError):
    """Input data that cannot be used as it is."""


class UnreadableURIError(DataError):
    """A URI that cannot be listed or read."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        super().__init__(f"cannot read {redact_uri(uri)}: {reason}")


class CorruptImageError(DataError):
    """An image file (or Parquet row) that does not decode completely."""

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__(f"corrupt image {redact_uri(path)}: {reason}")


class TaskRejectedError(DataError):
    """A task folder that cannot be registered; ``problems`` says what was found."""

    def __init__(self, task_id: str, reason: str, problems: Sequence[Problem] = ()):
        self.task_id = task_id
        self.reason = reason
        self.problems = list(problems)
        super().__init__(f"task {task_id!r} rejected: {reason}")


@dataclass(frozen=True)
class Problem:
    """Something a scan left out. ``kind`` is one of: corrupt_image, empty_class,
    unknown_test_class, not_an_image, bad_row."""

    task_id: str
    kind: str
    message: str
    path: str | None = None


@dataclass(frozen=True)
class _Item:
    """One labelled image: a file path, or a Parquet file plus a row index."""

    ref: str  # relative to the task folder: "train/cat/1.png" or "train.parquet#12"
    label: str


def _task_name(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def _family(fs, path: str, task_id: str, family_from: str) -> str:
    family_file = f"{path}/family.txt"
    if fs.exists(family_file):
        family = fs.cat_file(family_file).decode("utf-8").strip()
        if family:
            return family
    if family_from == "parent":
        return posixpath.basename(posixpath.dirname(path.rstrip("/"))) or task_id
    return re.split(r"__|-", task_id, maxsplit=1)[0] or task_id


def detect_format(uri: str) -> str | None:
    """``"imagefolder"``, ``"parquet"`` or None when ``uri`` holds no training split."""
    fs, path = filesystem_for(uri)
    if fs.isfile(f"{path}/train.parquet"):
        return "parquet"
    if fs.isdir(f"{path}/train"):
        return "imagefolder"
    return None


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode fully (``verify`` for structure, ``load`` for truncated pixel data) and return an
    RGB image; raises :class:`CorruptImageError` naming ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        img = Image.open(io.BytesIO(data))
        img.load()
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise CorruptImageError(name, str(exc) or type(exc).__name__) from exc
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), mode="L")
    return img.convert("RGB")


def _fetch(fs, paths: Sequence[str]) -> Iterator[tuple[str, bytes | Exception]]:
    """Bytes of each path, in order, fetched in batches (concurrently on object stores).
    ``cat_ranges`` takes names literally, where ``cat`` would glob ``[``, ``*`` and ``?``."""
    for i in range(0, len(paths), _FETCH_BATCH):
        batch = list(paths[i : i + _FETCH_BATCH])
        got = fs.cat_ranges(batch, None, None, on_error="return")
        yield from zip(batch, got, strict=True)


# -- listing -------------------------------------------------------------------------------
def _list_imagefolder_split(
    fs, path: str, split: str, task_id: str
) -> tuple[list[str], dict[str, list[str]], list[Problem]]:
    """(class dirs, files per class, problems) for one split; files are relative paths."""
    root = f"{path}/{split}"
    classes: list[str] = []
    files: dict[str, list[str]] = defaultdict(list)
    problems: list[Problem] = []
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.startswith(".") or name.startswith("_"):
            continue
        if entry["type"] == "directory":
            classes.append(name)
    for full in fs.find(root):
        rel = (
            full[len(root) + 1 :]
            if full.startswith(root + "/")
            else full.split(f"/{split}/", 1)[-1]
        )
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        rel_task = f"{split}/{rel}"
        if len(parts) < 2:
            problems.append(
                Problem(
                    task_id, "not_an_image", f"file outside a class folder: {rel_task}", rel_task
                )
            )
            continue
        if posixpath.splitext(parts[-1])[1].lower() not in IMAGE_EXTENSIONS:
            problems.append(
                Problem(task_id, "not_an_image", f"not an image file: {rel_task}", rel_task)
            )
            continue
        files[parts[0]].append(rel_task)
        if parts[0] not in classes:  # object stores have no empty "directories"
            classes.append(parts[0])
    return sorted(classes), {c: sorted(v) for c, v in files.items()}, problems


def _all_files_for_hash(fs, path: str) -> list[str]:
    out = []
    for split in SPLITS:
        root = f"{path}/{split}"
        if fs.isdir(root):
            out.extend(
                f
                for f in fs.find(root)
                if not any(s.startswith(".") for s in f[len(path) + 1 :].split("/"))
            )
    return sorted(out)


def _hash_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(pairs):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


# -- scanning ------------------------------------------------------------------------------
def scan_task(
    uri: str, *, family_from: str = "name-prefix", task_id: str | None = None
) -> tuple[TaskSpec, list[Problem]]:
    """Validate the task folder at ``uri`` and describe it.

    Returns the spec and the problems that were left out of it; raises
    :class:`TaskRejectedError` when the task cannot be used at all and
    :class:`UnreadableURIError` when ``uri`` cannot be read.
    """
    if family_from not in ("name-prefix", "parent"):
        raise ValueError(f"family_from must be 'name-prefix' or 'parent', got {family_from!r}")
    fs, path = filesystem_for(uri)
    data_uri = path if is_local(uri) else str(uri).rstrip("/")
    task_id = task_id or _task_name(path)
    try:
        check_plain_name(task_id, "task id")
    except ValueError as exc:
        raise TaskRejectedError(task_id, str(exc)) from exc
    try:
        if not fs.isdir(path):
            raise UnreadableURIError(uri, "not a directory (or does not exist)")
        fmt = detect_format(uri)
    except UnreadableURIError:
        raise
    except Exception as exc:  # permissions, network, bad bucket
        raise UnreadableURIError(uri, f"{type(exc).__name__}: {exc}") from exc
    if fmt is None:
        raise TaskRejectedError(task_id, "no training split: expected train/ or train.parquet")
    if fmt == "imagefolder":
        scanned = _scan_imagefolder(fs, path, task_id)
    else:
        scanned = _scan_parquet(fs, path, task_id)
    train_counts, test_counts, classes_seen, problems, content_hash = scanned
    classes = _trainable_classes(task_id, classes_seen, train_counts, test_counts, problems)
    n_train = sum(train_counts[c] for c in classes)
    n_test = sum(test_counts.get(c, 0) for c in classes)
    if n_test == 0:
        raise TaskRejectedError(task_id, "test split has no valid image of a known class", problems)
    try:
        spec = TaskSpec(
            task_id=task_id,
            family=_family(fs, path, task_id, family_from),
            data_uri=data_uri,
            format=fmt,
            classes=classes,
            n_train=n_train,
            n_test=n_test,
            content_hash=content_hash,
        )
    except ValueError as exc:  # a class name that is not a plain name
        raise TaskRejectedError(task_id, str(exc), problems) from exc
    for p in problems:
        log.warning("%s: %s", task_id, p.message)
    return spec, problems


def _trainable_classes(task_id: str, classes_seen: Sequence[str], train_counts: dict[str, int],
                       test_counts: dict[str, int], problems: list[Problem]) -> tuple[str, ...]:
    """The classes with training images, in the order seen. A class without any, and test
    images of a class that is not kept, are reported in ``problems`` rather than failing the
    task; fewer than two kept classes leave nothing to classify and reject it."""
    classes = tuple(c for c in classes_seen if train_counts.get(c, 0) > 0)
    for c in classes_seen:
        if c not in classes:
            problems.append(
                Problem(
                    task_id, "empty_class", f"class {c!r} has no valid training image; left out", c
                )
            )
    for c, n in sorted(test_counts.items()):
        if c not in classes and n:
            problems.append(
                Problem(
                    task_id,
                    "unknown_test_class",
                    f"{n} test image(s) of class {c!r}, which has no training data, not counted",
                    c,
                )
            )
    if len(classes) < 2:
        raise TaskRejectedError(
            task_id,
            f"needs at least 2 classes with training images, found {len(classes)} {list(classes)}",
            problems,
        )
    return classes


def _scan_imagefolder(fs, path: str, task_id: str):
    if not fs.isdir(f"{path}/test"):
        raise TaskRejectedError(task_id, "no test split: expected a test/ folder next to train/")
    problems: list[Problem] = []
    counts: dict[str, dict[str, int]] = {}
    classes_seen: list[str] = []
    to_check: list[str] = []
    for split in SPLITS:
        classes, files, split_problems = _list_imagefolder_split(fs, path, split, task_id)
        problems.extend(split_problems)
        counts[split] = dict.fromkeys(classes, 0)
        if split == "train":
            classes_seen = classes
        for fl in files.values():
            to_check.extend(fl)
    image_set = set(to_check)
    pairs: list[tuple[str, str]] = []
    all_files = _all_files_for_hash(fs, path)
    for full, data in _fetch(fs, all_files):
        rel = full[len(path) + 1 :]
        if isinstance(data, Exception):
            raise UnreadableURIError(f"{path}/{rel}", f"{type(data).__name__}: {data}")
        pairs.append((rel, hashlib.sha256(data).hexdigest()))
        if rel not in image_set:
            continue
        try:
            decode_image(data, rel)
        except CorruptImageError as exc:
            problems.append(Problem(task_id, "corrupt_image", f"skipped {exc}", rel))
            continue
        split, cls = rel.split("/")[:2]
        counts[split][cls] = counts[split].get(cls, 0) + 1
    return counts["train"], counts["test"], classes_seen, problems, _hash_pairs(pairs)


def _read_parquet_split(fs, path: str, split: str) -> tuple[list, list]:
    name = f"{split}.parquet"
    with fs.open(f"{path}/{name}", "rb") as f:
        table = pq.read_table(f)
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"{name} lacks column(s) {sorted(missing)}; has {table.column_names}")
    return table.column("image").to_pylist(), table.column("label").to_pylist()


def _scan_parquet(fs, path: str, task_id: str):
    if not fs.isfile(f"{path}/test.parquet"):
        raise TaskRejectedError(
            task_id, "no test split: expected test.parquet next to train.parquet"
        )
    problems: list[Problem] = []
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    classes_seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for split in SPLITS:
        name = f"{split}.parquet"
        raw = fs.cat_file(f"{path}/{name}")
        pairs.append((name, hashlib.sha256(raw).hexdigest()))
        try:
            images, labels = _read_parquet_split(fs, path, split)
        except DataError as exc:
            raise TaskRejectedError(task_id, str(exc)) from exc
        except Exception as exc:
            raise TaskRejectedError(
                task_id, f"{name} is not a readable Parquet file: {exc}"
            ) from exc
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            ref = f"{name}#{i}"
            if img is None or label is None:
                problems.append(
                    Problem(
                        task_id, "bad_row", f"row {ref} has a null image or label; skipped", ref
                    )
                )
                continue
            label = str(label)
            if split == "train":
                classes_seen.add(label)
            try:
                decode_image(img, ref)
            except CorruptImageError as exc:
                problems.append(Problem(task_id, "corrupt_image", f"skipped {exc}", ref))
                continue
            counts[split][label] = counts[split].get(label, 0) + 1
    return counts["train"], counts["test"], sorted(classes_seen), problems, _hash_pairs(pairs)


# -- loading -------------------------------------------------------------------------------
def list_split(spec: TaskSpec, split: str) -> list[tuple[str, str]]:
    """(ref, class) of every image of ``split`` whose class is in ``spec.classes``, sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    fs, path = filesystem_for(spec.data_uri)
    known = set(spec.classes)
    try:
        if spec.format == "imagefolder":
            _, files, _ = _list_imagefolder_split(fs, path, split, spec.task_id)
            items = [(ref, c) for c, refs in files.items() if c in known for ref in refs]
        elif spec.format == "parquet":
            _, labels = _read_parquet_split(fs, path, split)
            items = [
                (f"{split}.parquet#{i}", str(lab))
                for i, lab in enumerate(labels)
                if lab is not None and str(lab) in known
            ]
        else:
            raise DataError(f"task {spec.task_id!r}: unknown format {spec.format!r}")
    except (FileNotFoundError, PermissionError) as exc:
        raise UnreadableURIError(spec.data_uri, f"{split} split: {exc}") from exc
    return sorted(items)


def subsample(
    items: Sequence[tuple[str, str]], max_per_class: int | None, seed: int
) -> dict[str, list[str]]:
    """Refs per class, each class in a seeded random order (all refs when
    ``max_per_class`` is None, in sorted order). Seeding per class name makes one class's
    sample independent of the others."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for ref, c in items:
        by_class[c].append(ref)
    out = {}
    for c, refs in by_class.items():
        refs = sorted(refs)
        if max_per_class is not None and len(refs) > max_per_class:
            rng = np.random.default_rng([int(seed), zlib.crc32(c.encode())])
            refs = [refs[i] for i in rng.permutation(len(refs))]
        out[c] = refs
    return out


def _to_array(img: Image.Image, image_size: int) -> np.ndarray:
    img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return arr.transpose(2, 0, 1)


def load_split(
    spec: TaskSpec,
    split: str,
    image_size: int,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N×3×S×S float32, ImageNet-normalised, shorter side resized then centre-cropped)
    and labels (int64 indices into ``spec.classes``) of one split.

    With ``max_per_class`` each class contributes a seeded random subset; images that fail to
    decode (reported already by :func:`scan_task`) are skipped with a warning and the next one
    in the seeded order takes their place. Output is ordered by class, then by sample order.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if max_per_class is not None and max_per_class <= 0:
        raise ValueError(f"max_per_class must be positive, got {max_per_class}")
    fs, path = filesystem_for(spec.data_uri)
    per_class = subsample(list_split(spec, split), max_per_class, seed)
    rows: dict[str, bytes] = {}
    if spec.format == "parquet":
        images, _ = _read_parquet_split(fs, path, split)
        rows = {f"{split}.parquet#{i}": b for i, b in enumerate(images)}
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(spec.classes):
        refs = per_class.get(cls, [])
        want = len(refs) if max_per_class is None else min(max_per_class, len(refs))
        got = 0
        start = 0
        while got < want and start < len(refs):
            batch = refs[start : start + (want - got)]
            start += len(batch)
            if spec.format == "parquet":
                fetched = [(ref, rows[ref]) for ref in batch]
            else:
                fetched = [
                    (f[len(path) + 1 :], data)
                    for f, data in _fetch(fs, [f"{path}/{r}" for r in batch])
                ]
            for ref, data in fetched:
                if isinstance(data, Exception):
                    raise UnreadableURIError(f"{spec.data_uri}/{ref}", str(data))
                try:
                    img = decode_image(data, f"{spec.data_uri}/{ref}")
                except CorruptImageError as exc:
                    log.warning("task %s: %s", spec.task_id, exc)
                    continue
                arrays.append(_to_array(img, image_size))
                labels.append(label)
                got += 1
    if not arrays:
        raise DataError(f"task {spec.task_id!r}: no readable image in the {split} split")
    return torch.from_numpy(np.stack(arrays)), torch.tensor(labels, dtype=torch.int64)
