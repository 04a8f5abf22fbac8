"""Task and expert specs, and the zoo manifests that list them.

The manifests ``zoo/tasks.parquet`` and ``zoo/experts.parquet`` are the source of truth for
which tasks and experts exist and at which content hash; downstream results are keyed by
(task_id, content_hash), so a changed task is recomputed and an unchanged one is not.
Manifests have one writer at a time (the registration job); each write replaces the whole
file atomically. Upserts never delete: a task that disappears or stops validating keeps its
last row until it is removed on purpose.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import pyarrow as pa

from t2v_core.storage import EXPERTS_SCHEMA, TASKS_SCHEMA, StorageRoot, conform, redact_uri

log = logging.getLogger(__name__)

TASKS_MANIFEST = "zoo/tasks.parquet"
EXPERTS_MANIFEST = "zoo/experts.parquet"
_NOT_IN_NAMES = ("/", "\\", "\0")


class ManifestError(ValueError):
    """A manifest file that does not hold what a manifest holds; the message names the file."""


def check_plain_name(value: object, what: str) -> str:
    """``value`` when it is a plain name. Task, expert and class names become folder and file
    names under the root (``experts/<id>.pt``, ``features/task=<id>/...``), so a name with a
    path separator, ``..`` or an absolute path could write outside its place."""
    if (not isinstance(value, str) or value in ("", ".", "..")
            or any(c in value for c in _NOT_IN_NAMES)):
        raise ValueError(f"{what} {value!r} is not a plain name: it may not be empty, '.' or "
                         "'..', or contain '/', '\\' or NUL, since it names files under the root")
    return value


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: where its data is and what it contained when registered."""

    task_id: str
    family: str
    data_uri: str
    format: str  # "imagefolder" | "parquet"
    classes: tuple[str, ...]
    n_train: int
    n_test: int
    content_hash: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        check_plain_name(self.task_id, "task id")
        for c in self.classes:
            check_plain_name(c, f"task {self.task_id!r}: class")
        if self.format not in ("imagefolder", "parquet"):
            raise ValueError(f"task {self.task_id!r}: unknown format {self.format!r}")

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ExpertSpec:
    """One expert (feature extractor); ``source_task_id`` is None for the generic expert."""

    expert_id: str
    arch: str
    weights_uri: str
    source_task_id: str | None
    content_hash: str

    def __post_init__(self) -> None:
        check_plain_name(self.expert_id, "expert id")
        if self.source_task_id is not None:
            check_plain_name(self.source_task_id, f"expert {self.expert_id!r}: source task id")


@dataclass(frozen=True)
class UpsertReport:
    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated)


def _root(root: StorageRoot | str) -> StorageRoot:
    return root if isinstance(root, StorageRoot) else StorageRoot(root)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- keyed manifests ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Manifest:
    """A Parquet file of specs keyed by one id column: how a spec becomes a row and back."""

    rel: str
    schema: pa.Schema
    key: str
    to_row: Callable[[object], dict]
    from_row: Callable[[dict], object]

    def rows(self, root: StorageRoot) -> list[dict]:
        """The rows in the manifest's schema; a file that is not Parquet, lacks a required
        column or holds one that does not convert is a :class:`ManifestError` naming both."""
        if not root.exists(self.rel):
            return []
        where = redact_uri(root.join(self.rel))
        try:
            table = root.read_table(self.rel)
        except pa.ArrowInvalid as exc:
            raise ManifestError(f"{where} is not a readable Parquet file: {exc}") from exc
        for field in self.schema:
            _check_column(table, field, where)
        return conform(table, self.schema).to_pylist()

    def write_rows(self, root: StorageRoot, rows: list[dict]) -> None:
        rows = sorted(rows, key=lambda r: r[self.key])
        root.write_table_atomic(self.rel, pa.Table.from_pylist(rows, schema=self.schema))

    def read(self, root: StorageRoot | str) -> list:
        """Every spec, sorted by id; empty when there is no manifest yet."""
        root = _root(root)
        specs = []
        for row in sorted(self.rows(root), key=lambda r: r[self.key]):
            try:
                specs.append(self.from_row(row))
            except ValueError as exc:
                raise ManifestError(f"{redact_uri(root.join(self.rel))}: {exc}") from exc
        return specs

    def write(self, root: StorageRoot | str, specs: Iterable) -> None:
        """Replace the manifest with exactly ``specs``."""
        rows = [self.to_row(s) for s in specs]
        _check_unique([r[self.key] for r in rows], self.key)
        now = _now()
        self.write_rows(_root(root), [{**r, "updated_at": now} for r in rows])

    def upsert(self, root: StorageRoot | str, specs: Iterable) -> UpsertReport:
        """Add new specs and replace changed ones; unchanged rows keep their bytes, and
        nothing is written when nothing changed."""
        root = _root(root)
        new_rows = [self.to_row(s) for s in specs]
        _check_unique([r[self.key] for r in new_rows], self.key)
        existing = {r[self.key]: r for r in self.rows(root)}
        added, updated, unchanged = [], [], []
        now = _now()
        for row in new_rows:
            old = existing.get(row[self.key])
            if old is None:
                added.append(row[self.key])
            elif {k: v for k, v in old.items() if k != "updated_at"} == row:
                unchanged.append(row[self.key])
                continue
            else:
                updated.append(row[self.key])
            existing[row[self.key]] = {**row, "updated_at": now}
        report = UpsertReport(tuple(sorted(added)), tuple(sorted(updated)),
                              tuple(sorted(unchanged)))
        if report.changed:
            self.write_rows(root, list(existing.values()))
        return report


def _check_column(table: pa.Table, field: pa.Field, where: str) -> None:
    if field.name not in table.column_names:
        if not field.nullable:
            raise ManifestError(f"{where}: required column {field.name!r} is missing "
                                f"(columns: {', '.join(table.column_names)})")
        return
    column = table.column(field.name)
    if not field.nullable and column.null_count:
        raise ManifestError(f"{where}: column {field.name!r} has {column.null_count} empty "
                            "value(s)")
    try:
        column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ManifestError(f"{where}: column {field.name!r} holds {column.type}, not "
                            f"{field.type}: {exc}") from exc


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen, dup = set(), set()
    for i in ids:
        (dup if i in seen else seen).add(i)
    if dup:
        raise ValueError(f"duplicate {what}: {sorted(dup)}")


def _task_row(spec: TaskSpec) -> dict:
    row = asdict(spec)
    row["classes"] = list(spec.classes)
    row["n_classes"] = spec.n_classes
    return row


def _spec_from_row(cls: type) -> Callable[[dict], object]:
    """A row back into a spec: the spec's fields by name (extra columns like n_classes and
    updated_at are derived or bookkeeping)."""
    names = [f.name for f in fields(cls)]
    return lambda row: cls(**{name: row[name] for name in names})


_TASKS = _Manifest(TASKS_MANIFEST, TASKS_SCHEMA, "task_id", _task_row, _spec_from_row(TaskSpec))
_EXPERTS = _Manifest(EXPERTS_MANIFEST, EXPERTS_SCHEMA, "expert_id", asdict,
                     _spec_from_row(ExpertSpec))


def read_tasks(root: StorageRoot | str) -> list[TaskSpec]:
    """Registered tasks sorted by id; empty when there is no manifest yet."""
    return _TASKS.read(root)


def write_tasks(root: StorageRoot | str, specs: Iterable[TaskSpec]) -> None:
    """Replace the task manifest with exactly ``specs``."""
    _TASKS.write(root, specs)


def upsert_tasks(root: StorageRoot | str, specs: Iterable[TaskSpec]) -> UpsertReport:
    """Add new tasks and replace changed ones (keyed by task_id)."""
    return _TASKS.upsert(root, specs)


def read_experts(root: StorageRoot | str) -> list[ExpertSpec]:
    """Registered experts sorted by id; empty when there is no manifest yet."""
    return _EXPERTS.read(root)


def write_experts(root: StorageRoot | str, specs: Iterable[ExpertSpec]) -> None:
    """Replace the expert manifest with exactly ``specs``."""
    _EXPERTS.write(root, specs)


def upsert_experts(root: StorageRoot | str, specs: Iterable[ExpertSpec]) -> UpsertReport:
    """Add new experts and replace changed ones (keyed by expert_id)."""
    return _EXPERTS.upsert(root, specs)


# -- selection -----------------------------------------------------------------------------
def select_specs(specs: Sequence, patterns: str | Sequence[str] | None, *, what: str = "task"):
    """The specs whose id matches one of ``patterns`` (comma-separated text or a list of exact
    ids or shell globs), in manifest order; every job's ``--tasks``/``--experts`` follows this
    one rule. ``None`` or empty selects all. A pattern that matches nothing is an error, since
    a typo would otherwise silently shrink the job."""
    import fnmatch

    if not patterns:
        return list(specs)
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    pats = [p.strip() for p in patterns if p.strip()]
    ids = [_spec_id(s) for s in specs]
    unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(i, p) for i in ids)]
    if unmatched:
        raise ValueError(f"no registered {what} matches {', '.join(map(repr, unmatched))}")
    return [s for s, i in zip(specs, ids, strict=True)
            if any(fnmatch.fnmatchcase(i, p) for p in pats)]


def _spec_id(spec) -> str:
    return spec.expert_id if isinstance(spec, ExpertSpec) else spec.task_id
