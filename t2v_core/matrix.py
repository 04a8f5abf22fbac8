"""The task × expert performance matrix as Parquet rows under ``matrix/``.

One row per (task, expert, mode): the test error of the best configuration of that cell, the
recipe that produced it (``config`` JSON: hyper-parameters, recipe, data settings, code
version), how many configurations were tried (``trials``) and the device seconds spent
(``gpu_seconds``: seconds the cell held its trial's device; ``config.device`` says whether
that was a GPU). Rows carry the task and expert content hashes they were computed for, so a
re-registered task or re-trained expert makes its cells missing again.

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

from t2v_core.storage import MATRIX_SCHEMA, StorageRoot, conform, key_hash
from t2v_core.zoo import ExpertSpec, TaskSpec

log = logging.getLogger(__name__)

MATRIX_DIR = "matrix"
KEY_COLUMNS = ("task_id", "expert_id", "mode")
# The shared schema plus what a row needs to be versioned data: which recipe family produced
# it and for which content of the task and expert.
MATRIX_ROW_SCHEMA = pa.schema(
    list(MATRIX_SCHEMA)
    + [
        pa.field("mode", pa.string()),
        pa.field("task_hash", pa.string()),
        pa.field("expert_hash", pa.string()),
    ]
)
_STATUS_RANK = {"ok": 0, "failed": 1}


@dataclass(frozen=True)
class MatrixRow:
    """One cell of the matrix; ``status`` is "ok" or "failed" (then ``error`` says why and the
    errors are None)."""

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

    def record(self) -> dict:
        rec = {k: getattr(self, k) for k in MATRIX_ROW_SCHEMA.names if k != "config"}
        rec["config"] = json.dumps(self.config, sort_keys=True, default=str)
        return rec


def rows_table(rows: Iterable[MatrixRow]) -> pa.Table:
    return pa.Table.from_pylist([r.record() for r in rows], schema=MATRIX_ROW_SCHEMA)


def write_rows(root: StorageRoot, rows: Sequence[MatrixRow]) -> str:
    """Write ``rows`` as one idempotent part; returns its path under the root."""
    return root.write_part(MATRIX_DIR, rows_table(rows), list(KEY_COLUMNS))


def part_for(keys: Iterable[tuple[str, str, str]]) -> str:
    """The path :func:`write_rows` gives a part holding exactly these (task_id, expert_id,
    mode) cells, so a worker can tell with one lookup whether its cells were written."""
    cols = list(zip(*keys, strict=True))
    table = pa.table({k: pa.array(list(v), pa.string()) for k, v in zip(KEY_COLUMNS, cols, strict=True)})
    return f"{MATRIX_DIR}/part-{key_hash(table, list(KEY_COLUMNS))}.parquet"


def written(root: StorageRoot, tasks: Sequence[TaskSpec], expert: ExpertSpec, mode: str) -> bool:
    """Whether the part for these cells exists and holds rows of their current content."""
    rel = part_for([(t.task_id, expert.expert_id, mode) for t in tasks])
    if not root.exists(rel):
        return False
    rows = conform(root.read_table(rel), MATRIX_ROW_SCHEMA).to_pylist()
    want = {(t.task_id, t.content_hash, expert.expert_id, expert.content_hash) for t in tasks}
    return {(r["task_id"], r["task_hash"], r["expert_id"], r["expert_hash"]) for r in rows} == want


def read_matrix(
    root: StorageRoot,
    *,
    mode: str | None = None,
    tasks: Sequence[TaskSpec] | None = None,
    experts: Sequence[ExpertSpec] | None = None,
    dedup: bool = True,
) -> pa.Table:
    """The matrix rows (one per cell and mode when ``dedup``). With ``tasks`` / ``experts``,
    only rows of those tasks / experts at their current content hashes are kept."""
    if not root.exists(MATRIX_DIR):
        return MATRIX_ROW_SCHEMA.empty_table()
    raw = root.read_table(MATRIX_DIR)
    if raw.num_columns == 0:  # the directory holds no part yet
        return MATRIX_ROW_SCHEMA.empty_table()
    table = conform(raw, MATRIX_ROW_SCHEMA)
    rows = table.to_pylist()
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
    rows.sort(key=lambda r: tuple(r[k] or "" for k in KEY_COLUMNS))
    return pa.Table.from_pylist(rows, schema=MATRIX_ROW_SCHEMA)


def done_cells(
    root: StorageRoot,
    tasks: Sequence[TaskSpec],
    experts: Sequence[ExpertSpec],
    mode: str,
    *,
    retry_failed: bool = False,
) -> set[tuple[str, str]]:
    """(task_id, expert_id) of the cells that need no work: a current row exists (a failed
    one counts unless ``retry_failed``; failures here are deterministic divergences)."""
    table = read_matrix(root, mode=mode, tasks=tasks, experts=experts)
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
) -> tuple[np.ndarray, list[str], list[str]]:
    """T×E float array of ``value`` (NaN where a cell is missing or failed), with the task and
    expert ids of its rows and columns (sorted ids of the table when not given). The table
    must hold one row per cell (filter by mode first)."""
    rows = table.to_pylist()
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


def compact(root: StorageRoot) -> str | None:
    """Rewrite all matrix rows (deduplicated) as one part and remove the others. Readers
    during the swap may see a cell twice, which :func:`read_matrix` resolves."""
    parts = [p for p in root.list(MATRIX_DIR) if p.endswith(".parquet")]
    if len(parts) <= 1:
        return parts[0] if parts else None
    table = read_matrix(root)
    rel = root.write_part(MATRIX_DIR, table, list(KEY_COLUMNS))
    for p in parts:
        if p != rel:
            root.fs.rm(root.join(p))
    log.info("compacted %d matrix parts into %s (%d rows)", len(parts), rel, table.num_rows)
    return rel
