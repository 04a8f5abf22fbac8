"""The task × expert performance matrix as Parquet rows under ``matrix/``.

One row per (task, expert, mode, max_per_class): the test error of the best configuration of that cell, the
recipe that produced it (``config`` JSON: hyper-parameters, recipe, data settings, code
version), how many configurations were tried (``trials``) and the device seconds spent
(``gpu_seconds``: seconds the cell held its trial's device; ``config.device`` says whether
that was a GPU). Rows carry the task and expert content hashes they were computed for, so a
re-registered task or re-trained expert makes its cells missing again.

``max_per_class`` is the cap on training images per class the cell was trained with (null:
all of them), so matrices at several training-set sizes live side by side. Readers default to
the full-data rows; parts written before the column existed read as full data, unless their
``config`` records a cap (then that cap is their size).

Rows are written as idempotent parts (``matrix/part-<hash of keys>.parquet``): writing the
same cells twice rewrites one file instead of adding duplicates. A reader may still meet two
rows for one cell (a stale one, or a failed row and a later success in another part);
:func:`read_matrix` keeps one per cell, preferring rows of the current hashes and successes.
:func:`compact` folds many small parts into one.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from t2v_core.storage import MATRIX_SCHEMA, StorageRoot, conform, key_hash
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

log = logging.getLogger(__name__)

MATRIX_DIR = "matrix"
KEY_COLUMNS = ("task_id", "expert_id", "mode", "max_per_class")
# Full-data parts keep the names they had before the size was part of a cell's key.
_FULL_DATA_KEYS = KEY_COLUMNS[:3]
#: Pass as ``max_per_class`` to read the rows of every training-set size.
ANY_SIZE = "any"
# The shared schema plus what a row needs to be versioned data: which recipe family produced
# it, on how many training images per class, and for which content of the task and expert.
MATRIX_ROW_SCHEMA = pa.schema(
    list(MATRIX_SCHEMA)
    + [
        pa.field("mode", pa.string()),
        pa.field("max_per_class", pa.int32()),
        pa.field("task_hash", pa.string()),
        pa.field("expert_hash", pa.string()),
    ]
)
_STATUS_RANK = {"ok": 0, "failed": 1}


@dataclass(frozen=True)
class MatrixRow:
    """One cell of the matrix; ``status`` is "ok" or "failed" (then ``error`` says why and the
    errors are None). ``max_per_class`` None: trained on all training images."""

    task_id: str
    expert_id: str
    mode: str
    status: str
    test_error: float | None
    train_error: float | None
    n_train: int
    epochs: int
    trials: int
    gpu_seconds: float
    task_hash: str
    expert_hash: str
    config: dict = field(default_factory=dict)
    error: str | None = None
    max_per_class: int | None = None

    def record(self) -> dict:
        rec = {k: getattr(self, k) for k in MATRIX_ROW_SCHEMA.names if k != "config"}
        rec["config"] = json.dumps(self.config, sort_keys=True, default=str)
        return rec


def rows_table(rows: Iterable[MatrixRow]) -> pa.Table:
    return pa.Table.from_pylist([r.record() for r in rows], schema=MATRIX_ROW_SCHEMA)


def _part_keys(table: pa.Table) -> list[str]:
    """The key columns that name a part: full-data parts are named as they were before the
    size joined the key, so rewriting old cells replaces their part instead of adding one."""
    capped = table.column("max_per_class").null_count < table.num_rows
    return list(KEY_COLUMNS if capped else _FULL_DATA_KEYS)


def write_rows(root: StorageRoot, rows: Sequence[MatrixRow]) -> str:
    """Write ``rows`` as one idempotent part; returns its path under the root."""
    table = rows_table(rows)
    return root.write_part(MATRIX_DIR, table, _part_keys(table))


def part_for(keys: Iterable[tuple[str, str, str]], max_per_class: int | None = None) -> str:
    """The path :func:`write_rows` gives a part holding exactly these (task_id, expert_id,
    mode) cells at this training-set size, so a worker can tell with one lookup whether its
    cells were written."""
    cols = list(zip(*keys, strict=True))
    arrays = {k: pa.array(list(v), pa.string()) for k, v in zip(KEY_COLUMNS, cols, strict=False)}
    arrays["max_per_class"] = pa.array([max_per_class] * (len(cols[0]) if cols else 0), pa.int32())
    table = pa.table(arrays)
    return f"{MATRIX_DIR}/part-{key_hash(table, _part_keys(table))}.parquet"


def written(root: StorageRoot, tasks: Sequence[TaskSpec], expert: ExpertSpec, mode: str,
            max_per_class: int | None = None) -> bool:
    """Whether the part for these cells exists and holds rows of their current content."""
    rel = part_for([(t.task_id, expert.expert_id, mode) for t in tasks], max_per_class)
    if not root.exists(rel):
        return False
    rows = conform(root.read_table(rel), MATRIX_ROW_SCHEMA).to_pylist()
    want = {(t.task_id, t.content_hash, expert.expert_id, expert.content_hash, max_per_class)
            for t in tasks}
    return {(r["task_id"], r["task_hash"], r["expert_id"], r["expert_hash"], _size_of(r))
            for r in rows} == want


def _size_of(row: dict) -> int | None:
    """The row's training-set size; rows written before the column existed carry it only in
    their recipe (a cheap text test first: most rows are full data)."""
    if row.get("max_per_class") is not None:
        return row["max_per_class"]
    config = row.get("config") or ""
    if '"max_per_class": ' not in config or '"max_per_class": null' in config:
        return None
    cap = (json.loads(config).get("data") or {}).get("max_per_class")
    return None if cap is None else int(cap)


def _size_matches(row: dict, max_per_class: int | None | str) -> bool:
    return max_per_class == ANY_SIZE or row.get("max_per_class") == max_per_class


def _sort_key(row: dict) -> tuple:
    size = row["max_per_class"]
    return (*(row[k] or "" for k in _FULL_DATA_KEYS), size is not None, size or 0)


def read_matrix(
    root: StorageRoot,
    *,
    mode: str | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    experts: Sequence[ExpertSpec] | None = None,
    dedup: bool = True,
    max_per_class: int | None | str = None,
) -> pa.Table:
    """The matrix rows (one per cell, mode and size when ``dedup``). With ``tasks`` /
    ``experts``, only rows of those tasks / experts at their current content hashes are kept.
    ``max_per_class`` picks the training-set size: None (default) the full-data rows, a number
    the rows trained on at most that many images per class, :data:`ANY_SIZE` every row."""
    if not root.exists(MATRIX_DIR):
        return MATRIX_ROW_SCHEMA.empty_table()
    raw = root.read_table(MATRIX_DIR)
    if raw.num_columns == 0:  # the directory holds no part yet
        return MATRIX_ROW_SCHEMA.empty_table()
    table = conform(raw, MATRIX_ROW_SCHEMA)
    rows = table.to_pylist()
    for r in rows:
        r["max_per_class"] = _size_of(r)
    rows = [r for r in rows if _size_matches(r, max_per_class)]
    if mode is not None:
        rows = [r for r in rows if r["mode"] == mode]
    if tasks is not None:
        cur = {t.task_id: t.content_hash for t in tasks}
        rows = [r for r in rows if cur.get(r["task_id"]) == r["task_hash"]]
    if experts is not None:
        cur = {e.expert_id: e.content_hash for e in experts}
        rows = [r for r in rows if cur.get(r["expert_id"]) == r["expert_hash"]]
    if dedup:
        best: dict[tuple, dict] = {}
        for r in sorted(rows, key=lambda r: (_STATUS_RANK.get(r["status"], 9), r["config"] or "")):
            best.setdefault(tuple(r[k] for k in KEY_COLUMNS), r)
        rows = list(best.values())
    rows.sort(key=_sort_key)
    return pa.Table.from_pylist(rows, schema=MATRIX_ROW_SCHEMA)


def sizes(root: StorageRoot, mode: str | None = None) -> list[int | None]:
    """The training-set sizes the matrix holds rows for, capped ones ascending, None last."""
    found = {r["max_per_class"] for r in read_matrix(root, mode=mode, max_per_class=ANY_SIZE,
                                                     dedup=False).to_pylist()}
    return sorted(s for s in found if s is not None) + ([None] if None in found else [])


def done_cells(
    root: StorageRoot,
    tasks: Sequence[TaskSpec],
    experts: Sequence[ExpertSpec],
    mode: str,
    *,
    retry_failed: bool = False,
    max_per_class: int | None = None,
) -> set[tuple[str, str]]:
    """(task_id, expert_id) of the cells at this training-set size that need no work: a
    current row exists (a failed one counts unless ``retry_failed``; failures here are
    deterministic divergences)."""
    table = read_matrix(root, mode=mode, tasks=tasks, experts=experts,
                        max_per_class=max_per_class)
    return {
        (r["task_id"], r["expert_id"])
        for r in table.to_pylist()
        if r["status"] == "ok" or not retry_failed
    }


def shard_of(task_id: str, expert_id: str, n_shards: int) -> int:
    """Stable shard of a cell: a hash of its key, so adding tasks or experts never moves the
    cells that already exist to another shard."""
    return zlib.crc32(f"{task_id}\0{expert_id}".encode()) % n_shards


def missing_cells(
    tasks: Sequence[TaskSpec],
    experts: Sequence[ExpertSpec],
    done: set[tuple[str, str]],
    *,
    shard: tuple[int, int] | None = None,
) -> list[tuple[TaskSpec, ExpertSpec]]:
    """Cells of ``tasks`` × ``experts`` (in shard ``i`` of ``n`` when given) not in ``done``,
    ordered by expert then task so that consecutive cells share an expert."""
    out = []
    for e in sorted(experts, key=lambda e: e.expert_id):
        for t in sorted(tasks, key=lambda t: t.task_id):
            if (t.task_id, e.expert_id) in done:
                continue
            if shard is not None and shard_of(t.task_id, e.expert_id, shard[1]) != shard[0]:
                continue
            out.append((t, e))
    return out


def pivot(
    table: pa.Table,
    task_ids: Sequence[str] | None = None,
    expert_ids: Sequence[str] | None = None,
    value: str = "test_error",
    *,
    max_per_class: int | None | str = None,
) -> tuple[np.ndarray, list[str], list[str]]:
    """T×E float array of ``value`` (NaN where a cell is missing or failed), with the task and
    expert ids of its rows and columns (sorted ids of the table when not given). Only rows of
    the training-set size ``max_per_class`` count (None: full data; a table without the
    column is full data). The table must hold one row per cell (filter by mode first)."""
    rows = [r for r in table.to_pylist() if _size_matches(r, max_per_class)]
    task_ids = list(task_ids) if task_ids is not None else sorted({r["task_id"] for r in rows})
    expert_ids = list(expert_ids) if expert_ids is not None else sorted({r["expert_id"] for r in rows})
    ti = {t: i for i, t in enumerate(task_ids)}
    ei = {e: j for j, e in enumerate(expert_ids)}
    out = np.full((len(task_ids), len(expert_ids)), np.nan)
    seen = set()
    for r in rows:
        i, j = ti.get(r["task_id"]), ei.get(r["expert_id"])
        if i is None or j is None:
            continue
        if (i, j) in seen:
            raise ValueError(f"two rows for cell ({r['task_id']}, {r['expert_id']}); "
                             "filter by mode or read with dedup")
        seen.add((i, j))
        if r.get("status", "ok") == "ok" and r[value] is not None:
            out[i, j] = r[value]
    return out, task_ids, expert_ids


def compact(root: StorageRoot) -> list[str]:
    """Rewrite all matrix rows (deduplicated) as one part per training-set size and remove the
    others; returns the parts left. Readers during the swap may see a cell twice, which
    :func:`read_matrix` resolves."""
    parts = [p for p in root.list(MATRIX_DIR) if p.endswith(".parquet")]
    if len(parts) <= 1:
        return parts
    table = read_matrix(root, max_per_class=ANY_SIZE)
    column = table.column("max_per_class")
    kept = []
    for size in sorted(set(column.to_pylist()), key=lambda s: (s is None, s or 0)):
        mask = pc.is_null(column) if size is None else pc.equal(column, size)
        one = table.filter(mask)
        kept.append(root.write_part(MATRIX_DIR, one, _part_keys(one)))
    for p in parts:
        if p not in kept:
            root.fs.rm(root.join(p))
    log.info("compacted %d matrix parts into %d (%d rows)", len(parts), len(kept), table.num_rows)
    return kept
