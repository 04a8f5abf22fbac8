"""Task embeddings as a keyed Parquet dataset: what is missing, how results land, how to read them.

Layout under a storage root (one dataset per probe and Fisher estimator)::

    embeddings/probe=<probe_id>/_filters.parquet                 filter names, once per probe
    embeddings/probe=<probe_id>/method=<m>/part-<hash>.parquet   one row per embedded task
    embedding_failures/probe=<probe_id>/method=<m>/part-<hash>.parquet

Rows are keyed by (task_id, content_hash, probe, method, max_per_class): a task whose data
changed gets a new row next to the old one, and readers pick the row that matches the manifest
(or the newest). ``max_per_class`` is the training-set size the embedding was computed on, at
most that many images per class (null: all of them), as the matrix keys its cells: a task's
full-data embedding and its embeddings on a few images per class sit side by side in one
dataset, and each reader asks for one size. Rows written before the column existed read as
full data, which is what they were used as.
Each row is written as its own part file named after its key, so writing a key again (a re-run,
or two runs started at the same time that both embed a task) replaces that file: on disk there
is one row per key whatever the writers did. A full-data part is named after the key without
the size, so its name is the one the earlier layout gave it. Parts of the earlier layout hold
several keys each; they are read like any other part, and readers keep the newest row of a key.
Embeddings on capped subsets used to live under ``subsampled/max_per_class=<n>/`` with a copy
of the task manifest; readers of that size still find them there.
The filter names are long and identical for every task of a probe, so they are stored once;
their file starts with ``_`` so that dataset readers (pyarrow, Spark, :class:`StorageRoot`)
never mix it into the embedding rows. Failures live in a sibling tree for the same reason.

Nothing here knows about Ray: the batch job fans :func:`run_task` out and feeds the outcomes
to an :class:`EmbeddingWriter`; a notebook can call the same functions in a loop.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from t2v_core.embedding.fisher import Embedding, task2vec
from t2v_core.embedding.probes import Probe, build_probe
from t2v_core.storage import EMBEDDINGS_SCHEMA, StorageRoot, redact_uri
from t2v_core.zoo.data import UnreadableURIError, load_split
from t2v_core.zoo.manifest import TaskSpec

log = logging.getLogger(__name__)

KEY_COLUMNS = ("task_id", "content_hash", "probe", "method")
#: The key of a row computed on a capped subset; full-data rows keep :data:`KEY_COLUMNS`.
SIZED_KEY_COLUMNS = (*KEY_COLUMNS, "max_per_class")
#: Where capped-subset embeddings were kept before the size joined the key.
LEGACY_SUBSAMPLED_DIR = "subsampled"
_TIMESTAMP = pa.timestamp("us", tz="UTC")

#: The shared embeddings schema plus the recipe and bookkeeping columns of this dataset.
EMBEDDING_ROWS_SCHEMA = pa.schema(
    list(EMBEDDINGS_SCHEMA)
    + [
        pa.field("filters_digest", pa.string()),  # sha256 of the filter names, see _filters.parquet
        pa.field("config", pa.string()),  # JSON recipe: image size, sample caps, seed, ...
        pa.field("seconds", pa.float64()),  # compute time of the task on its worker
        pa.field("max_per_class", pa.int32()),  # training images per class; null: all
    ]
)

FAILURES_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("probe", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("transient", pa.bool_(), nullable=False),
        pa.field("config", pa.string()),
        pa.field("failed_at", _TIMESTAMP),
        pa.field("max_per_class", pa.int32()),
    ]
)

FILTERS_SCHEMA = pa.schema(
    [pa.field("index", pa.int32(), nullable=False), pa.field("name", pa.string(), nullable=False)]
)

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_MAX_ERROR_CHARS = 2000


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, UnreadableURIError]
    try:  # S3 connection errors come from botocore and are not OSErrors
        from botocore.exceptions import BotoCoreError

        types.append(BotoCoreError)
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    return tuple(types)


#: Errors worth retrying: I/O and network trouble. Data and Fisher errors are deterministic and
#: are recorded instead, so a bad task costs one attempt, not ``max_retries`` of them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = _transient_types()


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


class EmbeddingStorageError(RuntimeError):
    """The storage root could not be read or written; the message names the root (redacted)."""


# -- paths ---------------------------------------------------------------------------------
def _segment(value: str, what: str) -> str:
    if not _SEGMENT.match(value):
        raise ValueError(f"{what} {value!r} cannot name a partition: use letters, digits, ._+-")
    return value


def dataset_path(probe_id: str, method: str) -> str:
    return f"embeddings/probe={_segment(probe_id, 'probe id')}/method={_segment(method, 'method')}"


def failures_path(probe_id: str, method: str) -> str:
    return (
        f"embedding_failures/probe={_segment(probe_id, 'probe id')}"
        f"/method={_segment(method, 'method')}"
    )


def filters_path(probe_id: str) -> str:
    return f"embeddings/probe={_segment(probe_id, 'probe id')}/_filters.parquet"


def filters_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def clean_error(message: str) -> str:
    """An error message safe to store and log: URI user-info removed, length capped."""
    message = _USERINFO.sub(r"\1", str(message))
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " …"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the computation of one task -----------------------------------------------------------
@dataclass(frozen=True)
class EmbedConfig:
    """The recipe of an embedding. Stored with every row, so a row says how it was made."""

    method: str = "montecarlo"
    image_size: int | None = None  # None: the probe's input size
    max_per_class: int | None = None  # images loaded per class (seeded subset); None: all
    max_samples: int | None = None  # images used for the Fisher (seeded subset); None: all
    seed: int = 0
    batch_size: int = 64
    mc_samples: int = 1

    def resolved(self, probe: Probe) -> EmbedConfig:
        return dataclasses.replace(self, image_size=self.image_size or probe.input_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class TaskOutcome:
    """What one task produced: an embedding vector, or the reason it has none."""

    task_id: str
    content_hash: str
    vector: np.ndarray | None = None
    n_samples: int | None = None
    seconds: float = 0.0
    error_type: str | None = None
    error: str | None = None
    transient: bool = False

    @property
    def ok(self) -> bool:
        return self.vector is not None

    @classmethod
    def failure(cls, spec: TaskSpec, exc: BaseException, *, transient: bool | None = None,
                seconds: float = 0.0) -> TaskOutcome:
        return cls(
            task_id=spec.task_id,
            content_hash=spec.content_hash,
            seconds=seconds,
            error_type=type(exc).__name__,
            error=clean_error(str(exc) or type(exc).__name__),
            transient=is_transient(exc) if transient is None else transient,
        )


def probe_from_state(
    arch: str, state_dict: dict[str, torch.Tensor], probe_id: str, input_size: int | None = None
) -> Probe:
    """Rebuild a probe on a worker from a state dict shipped by the driver, keeping its id."""
    probe = build_probe(arch, seed=0, input_size=input_size)
    probe.backbone.load_state_dict(state_dict, strict=True)
    return dataclasses.replace(probe, probe_id=probe_id)


def probe_device(probe: Probe) -> torch.device:
    param = next(probe.backbone.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def embed_task(spec: TaskSpec, probe: Probe, config: EmbedConfig) -> Embedding:
    """Load a task's training split and embed it with ``probe`` (on the probe's device)."""
    config = config.resolved(probe)
    images, labels = load_split(spec, "train", config.image_size, config.max_per_class, config.seed)
    device = probe_device(probe)
    if device.type != "cpu":
        images, labels = images.to(device), labels.to(device)
    return task2vec(
        probe,
        images,
        labels,
        n_classes=spec.n_classes,
        method=config.method,
        max_samples=config.max_samples,
        batch_size=config.batch_size,
        mc_samples=config.mc_samples,
        seed=config.seed,
        task_id=spec.task_id,
    )


def run_task(spec: TaskSpec, probe: Probe, config: EmbedConfig) -> TaskOutcome:
    """Embed one task and say how it went.

    Transient errors (I/O, network, S3) are raised so that the caller may retry them; any other
    error is deterministic for this data and recipe and comes back as a failed outcome.
    """
    start = time.perf_counter()
    try:
        emb = embed_task(spec, probe, config)
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        log.warning("task %s failed: %s: %s", spec.task_id, type(exc).__name__, clean_error(exc))
        return TaskOutcome.failure(spec, exc, transient=False,
                                   seconds=time.perf_counter() - start)
    return TaskOutcome(
        task_id=spec.task_id,
        content_hash=spec.content_hash,
        vector=np.asarray(emb.vector, dtype=np.float32),
        n_samples=emb.n_samples,
        seconds=time.perf_counter() - start,
    )


# -- rows ----------------------------------------------------------------------------------
def embeddings_table(
    outcomes: Sequence[TaskOutcome],
    probe_id: str,
    method: str,
    *,
    config: str | None = None,
    filters: str | None = None,
    created_at: dt.datetime | None = None,
    max_per_class: int | None = None,
) -> pa.Table:
    """Arrow rows of the successful outcomes (schema :data:`EMBEDDING_ROWS_SCHEMA`), computed
    on at most ``max_per_class`` training images per class (None: all)."""
    ok = [o for o in outcomes if o.ok]
    created_at = created_at or _now()
    return pa.Table.from_pylist(
        [
            {
                "task_id": o.task_id,
                "content_hash": o.content_hash,
                "probe": probe_id,
                "method": method,
                "embedding": np.asarray(o.vector, dtype=np.float32),
                "dim": int(o.vector.shape[0]),
                "n_samples": o.n_samples,
                "created_at": created_at,
                "filters_digest": filters,
                "config": config,
                "seconds": float(o.seconds),
                "max_per_class": max_per_class,
            }
            for o in ok
        ],
        schema=EMBEDDING_ROWS_SCHEMA,
    )


def failures_table(
    outcomes: Sequence[TaskOutcome],
    probe_id: str,
    method: str,
    *,
    config: str | None = None,
    failed_at: dt.datetime | None = None,
    max_per_class: int | None = None,
) -> pa.Table:
    failed_at = failed_at or _now()
    return pa.Table.from_pylist(
        [
            {
                "task_id": o.task_id,
                "content_hash": o.content_hash,
                "probe": probe_id,
                "method": method,
                "error_type": o.error_type or "Error",
                "error": o.error or "",
                "transient": bool(o.transient),
                "config": config,
                "failed_at": failed_at,
                "max_per_class": max_per_class,
            }
            for o in outcomes
            if not o.ok
        ],
        schema=FAILURES_SCHEMA,
    )


def _read(root: StorageRoot, rel: str, schema: pa.Schema) -> pa.Table:
    return root.read_table(rel, schema=schema) if root.exists(rel) else schema.empty_table()


def part_keys(table: pa.Table) -> tuple[str, ...]:
    """The columns a part's file name is made from: the size joins the key only when it is
    set, so a full-data part keeps the name the earlier layout gave it."""
    capped = table.column("max_per_class").null_count < table.num_rows
    return SIZED_KEY_COLUMNS if capped else KEY_COLUMNS


def legacy_path(rel: str, max_per_class: int) -> str:
    """Where the earlier layout kept dataset ``rel`` of a capped size: under a root of its own."""
    return f"{LEGACY_SUBSAMPLED_DIR}/max_per_class={int(max_per_class)}/{rel}"


def _read_size(root: StorageRoot, rel: str, schema: pa.Schema, max_per_class: int | None,
               columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of dataset ``rel`` computed at one training-set size (None: full data; rows
    without the column count as full data), and for a capped size also the rows the earlier
    layout kept for it under :func:`legacy_path`. Whole rows are read: parts written before
    the size column existed lack it, and Parquet refuses to select a column a file lacks."""
    table = _read(root, rel, schema)
    size = table.column("max_per_class")
    table = table.filter(pc.is_null(size) if max_per_class is None
                         else pc.fill_null(pc.equal(size, max_per_class), False))
    if max_per_class is not None:
        legacy = _read(root, legacy_path(rel, max_per_class), schema)
        sized = pa.array([max_per_class] * legacy.num_rows, pa.int32())
        legacy = legacy.set_column(legacy.schema.get_field_index("max_per_class"),
                                   "max_per_class", sized)
        table = pa.concat_tables([legacy, table])
    return table if columns is None else table.select(list(columns))


def describe_size(max_per_class: int | None) -> str:
    """A training-set size as log and error messages name it."""
    return "all images" if max_per_class is None else f"{max_per_class} images per class"


def _newest(table: pa.Table, keys: Sequence[str], time_column: str) -> pa.Table:
    """One row per key: the one with the latest ``time_column`` (ties: the later row)."""
    if table.num_rows == 0:
        return table
    table = table.append_column("_row", pa.array(np.arange(table.num_rows)))
    order = table.sort_by([(time_column, "descending"), ("_row", "descending")])
    seen: set[tuple] = set()
    keep: list[int] = []
    key_lists = [order.column(k).to_pylist() for k in keys]
    for i, key in enumerate(zip(*key_lists, strict=True)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    out = order.take(pa.array(keep, pa.int64())).drop_columns(["_row"])
    return out.sort_by([(k, "ascending") for k in keys])


# -- filter names --------------------------------------------------------------------------
def read_filter_names(root: StorageRoot, probe_id: str) -> tuple[str, ...]:
    table = root.read_table(filters_path(probe_id), schema=FILTERS_SCHEMA).sort_by("index")
    return tuple(table.column("name").to_pylist())


def write_filter_names(root: StorageRoot, probe_id: str, names: Sequence[str]) -> bool:
    """Store the probe's filter names once. Returns True when written, False when the same
    names were there already; raises if different names are stored for this probe id."""
    rel = filters_path(probe_id)
    if root.exists(rel):
        stored = read_filter_names(root, probe_id)
        if stored != tuple(names):
            raise ValueError(
                f"probe {probe_id!r} already has {len(stored)} different filter names stored; "
                "a probe id must always name the same network"
            )
        return False
    table = pa.table(
        {"index": pa.array(range(len(names)), pa.int32()), "name": pa.array(list(names))},
        schema=FILTERS_SCHEMA,
    )
    root.write_table_atomic(rel, table)
    return True


# -- what is missing -----------------------------------------------------------------------
def read_failures(root: StorageRoot, probe_id: str, method: str,
                  max_per_class: int | None = None) -> pa.Table:
    """Recorded failures at one training-set size, the newest per (task_id, content_hash)."""
    table = _read_size(root, failures_path(probe_id, method), FAILURES_SCHEMA, max_per_class)
    return _newest(table, ["task_id", "content_hash"], "failed_at")


@dataclass(frozen=True)
class EmbedPlan:
    """Which tasks a run must embed, and why the others are skipped."""

    todo: tuple[TaskSpec, ...]
    up_to_date: tuple[str, ...]
    failed_before: dict[str, str] = field(default_factory=dict)  # task_id -> recorded error
    other_recipe: tuple[str, ...] = ()  # up to date, but embedded with another recipe


def plan_embeddings(
    root: StorageRoot,
    tasks: Iterable[TaskSpec],
    probe_id: str,
    method: str,
    *,
    config: EmbedConfig | None = None,
    retry_failed: bool = False,
) -> EmbedPlan:
    """Split ``tasks`` into those without an embedding at their current content hash (to do)
    and the rest, at the training-set size of ``config`` (None: full data). A task that failed
    for good at its current hash and size is skipped unless ``retry_failed``; one that failed
    transiently is always tried again."""
    cap = config.max_per_class if config is not None else None
    existing = _read_size(root, dataset_path(probe_id, method), EMBEDDING_ROWS_SCHEMA, cap,
                          columns=["task_id", "content_hash", "config"])
    have: dict[tuple[str, str], set[str | None]] = {}
    for t, h, c in zip(*(existing.column(n).to_pylist() for n in existing.column_names),
                       strict=True):
        have.setdefault((t, h), set()).add(c)
    failed: dict[tuple[str, str], str] = {}
    if not retry_failed:
        for row in read_failures(root, probe_id, method, cap).to_pylist():
            if not row["transient"]:
                failed[(row["task_id"], row["content_hash"])] = (
                    f"{row['error_type']}: {row['error']}"
                )
    want = config.to_json() if config is not None else None
    todo, done, skipped, other = [], [], {}, []
    for spec in tasks:
        key = (spec.task_id, spec.content_hash)
        if key in have:
            done.append(spec.task_id)
            if want is not None and want not in have[key]:
                other.append(spec.task_id)
        elif key in failed:
            skipped[spec.task_id] = failed[key]
        else:
            todo.append(spec)
    if other:
        log.warning(
            "%d task(s) already have %s/%s embeddings on %s made with another recipe; they are "
            "kept (first: %s)", len(other), probe_id, method, describe_size(cap), other[0],
        )
    return EmbedPlan(tuple(todo), tuple(done), skipped, tuple(other))


# -- writing in batches --------------------------------------------------------------------
@dataclass
class EmbedSummary:
    """What a run did; ``failed`` maps a task id to its error."""

    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    up_to_date: list[str] = field(default_factory=list)
    failed_before: dict[str, str] = field(default_factory=dict)
    parts: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"{len(self.done)} embedded, {len(self.up_to_date)} up to date, "
            f"{len(self.failed_before)} skipped (failed before), {len(self.failed)} failed, "
            f"{len(self.parts)} part file(s) written"
        ]
        out += [f"failed {t}: {e}" for t, e in sorted(self.failed.items())]
        out += [f"skipped {t} (failed before; --retry-failed to try again): {e}"
                for t, e in sorted(self.failed_before.items())]
        return out


class EmbeddingWriter:
    """Buffers outcomes and writes them, one part file per key, as soon as ``batch_size`` tasks
    are waiting or the oldest has waited ``max_wait_s`` seconds, whichever comes first: a crash
    loses at most that many finished tasks, or that much of their time.

    A failed write is retried with exponential backoff; when storage stays unreachable an
    :class:`EmbeddingStorageError` names the root (credentials never appear: they are not part
    of a URI here, and user-info in URIs is redacted). The buffer is kept, so a later
    :meth:`flush` can still write it.
    """

    def __init__(
        self,
        root: StorageRoot,
        probe_id: str,
        method: str,
        filter_names: Sequence[str],
        *,
        config: EmbedConfig | None = None,
        batch_size: int = 8,
        max_wait_s: float = 60.0,
        write_retries: int = 3,
        retry_backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.root, self.probe_id, self.method = root, probe_id, method
        self.filter_names = tuple(filter_names)
        self.digest = filters_digest(self.filter_names)
        self.config = config.to_json() if config is not None else None
        self.max_per_class = config.max_per_class if config is not None else None
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.write_retries, self.retry_backoff_s = write_retries, retry_backoff_s
        self.clock = clock
        self.summary = EmbedSummary()
        self._pending: list[TaskOutcome] = []
        self._since: float | None = None
        self._filters_ok = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, outcome: TaskOutcome) -> list[str]:
        """Buffer one outcome; write the buffer when it is full or due. Returns the parts
        written."""
        if outcome.ok and outcome.vector.shape != (len(self.filter_names),):
            raise ValueError(
                f"task {outcome.task_id}: embedding has shape {outcome.vector.shape}, the probe "
                f"has {len(self.filter_names)} filters"
            )
        if self._since is None:
            self._since = self.clock()
        self._pending.append(outcome)
        return self.flush() if len(self._pending) >= self.batch_size else self.flush_if_due()

    def flush_if_due(self) -> list[str]:
        """Write the buffer if its oldest outcome has waited ``max_wait_s``; call it while
        waiting for results, so that a slow trickle of tasks is written too."""
        if self._pending and self.clock() - (self._since or 0.0) >= self.max_wait_s:
            return self.flush()
        return []

    def flush(self) -> list[str]:
        """Write everything buffered (embeddings, then failures). Returns the parts written."""
        if not self._pending:
            return []
        batch = list(self._pending)
        ok = [o for o in batch if o.ok]
        bad = [o for o in batch if not o.ok]
        parts: list[str] = []
        if ok:
            if not self._filters_ok:
                self._retrying(
                    "filter names",
                    lambda: write_filter_names(self.root, self.probe_id, self.filter_names),
                )
                self._filters_ok = True
            table = embeddings_table(ok, self.probe_id, self.method, config=self.config,
                                     filters=self.digest, max_per_class=self.max_per_class)
            parts += self._write_per_key("embeddings", dataset_path(self.probe_id, self.method),
                                         table)
        if bad:
            table = failures_table(bad, self.probe_id, self.method, config=self.config,
                                   max_per_class=self.max_per_class)
            parts += self._write_per_key(
                "failure records", failures_path(self.probe_id, self.method), table)
        self._pending.clear()
        self._since = None
        self.summary.parts.extend(parts)
        self.summary.done.extend(o.task_id for o in ok)
        self.summary.failed.update({o.task_id: f"{o.error_type}: {o.error}" for o in bad})
        log.debug("wrote %d embedding(s) and %d failure(s): %s", len(ok), len(bad), parts)
        return parts

    def _write_per_key(self, what: str, dataset: str, table: pa.Table) -> list[str]:
        """One part per row, named after the row's key: a key written again replaces its file."""
        return [
            self._retrying(what, lambda row=row: self.root.write_part(dataset, row, part_keys(row)))
            for row in (table.slice(i, 1) for i in range(table.num_rows))
        ]

    def _retrying(self, what: str, fn: Callable[[], object]):
        attempts = 1 + max(0, self.write_retries)
        for attempt in range(attempts):
            try:
                return fn()
            except TRANSIENT_ERRORS as exc:
                if attempt + 1 >= attempts:
                    raise EmbeddingStorageError(
                        f"cannot write {what} under {redact_uri(self.root.uri)} after {attempts} "
                        f"attempt(s): {type(exc).__name__}: {clean_error(exc)}"
                    ) from exc
                delay = self.retry_backoff_s * 2**attempt
                log.warning("writing %s under %s failed (%s); retrying in %.1fs", what,
                            redact_uri(self.root.uri), type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")


# -- reading back --------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingMatrix:
    """Embeddings of many tasks as one float32 matrix, one row per task."""

    task_ids: tuple[str, ...]
    content_hashes: tuple[str, ...]
    vectors: np.ndarray  # N × D float32
    probe: str
    method: str
    filter_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.task_ids)

    def row(self, task_id: str) -> np.ndarray:
        return self.vectors[self.task_ids.index(task_id)]


def read_embedding_rows(root: StorageRoot, probe_id: str, method: str,
                        max_per_class: int | None = None) -> pa.Table:
    """Every stored row of a probe and method at one training-set size (None: full data),
    duplicates and old content hashes included."""
    return _read_size(root, dataset_path(probe_id, method), EMBEDDING_ROWS_SCHEMA, max_per_class)


def read_embeddings(
    root: StorageRoot | str,
    probe_id: str,
    method: str,
    tasks: Sequence[TaskSpec] | None = None,
    *,
    max_per_class: int | None = None,
    with_filter_names: bool = True,
) -> EmbeddingMatrix:
    """The embeddings of a probe and method as a matrix, those computed on at most
    ``max_per_class`` training images per class (None: on all of them).

    Without ``tasks``: the newest row of every task id, sorted by id. With ``tasks`` (e.g. the
    manifest): in their order, the row at each task's current content hash; tasks without one
    are left out (and logged).
    """
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    table = read_embedding_rows(root, probe_id, method, max_per_class)
    if tasks is None:
        table = _newest(table, ["task_id"], "created_at")
    else:
        table = _newest(table, ["task_id", "content_hash"], "created_at")
        wanted = {(s.task_id, s.content_hash): i for i, s in enumerate(tasks)}
        keys = zip(table.column("task_id").to_pylist(), table.column("content_hash").to_pylist(),
                   strict=True)
        index = [wanted.get(k, -1) for k in keys]
        table = table.append_column("_order", pa.array(index, pa.int64()))
        table = table.filter(pc.greater_equal(table.column("_order"), 0))
        table = table.sort_by("_order").drop_columns(["_order"])
        if table.num_rows < len(wanted):
            log.info("%d of %d task(s) have no %s/%s embedding on %s at their current content "
                     "hash", len(wanted) - table.num_rows, len(wanted), probe_id, method,
                     describe_size(max_per_class))
    dims = set(table.column("dim").to_pylist())
    if len(dims) > 1:
        raise ValueError(f"{probe_id}/{method} rows have different dimensions {sorted(dims)}")
    dim = dims.pop() if dims else 0
    flat = pc.list_flatten(table.column("embedding")).to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, dtype=np.float32).reshape(table.num_rows, dim)
    names = None
    if with_filter_names and root.exists(filters_path(probe_id)):
        names = read_filter_names(root, probe_id)
    return EmbeddingMatrix(
        task_ids=tuple(table.column("task_id").to_pylist()),
        content_hashes=tuple(table.column("content_hash").to_pylist()),
        vectors=vectors,
        probe=probe_id,
        method=method,
        filter_names=names,
    )
