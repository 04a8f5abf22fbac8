"""Parquet storage under one root URI (a local path or ``s3://bucket/prefix``).

Every job reads and writes its results through :class:`StorageRoot`, so that the two
guarantees the batch system relies on live in one place:

* atomic writes: a reader never sees a half-written file. Locally the bytes go to a hidden
  temporary file in the target directory and are moved into place with ``os.replace``; on S3
  an object only becomes visible when its single PUT (or multipart upload) completes.
* idempotent writes: :meth:`StorageRoot.write_part` names a part file after a hash of its key
  values, so re-running a job with the same rows rewrites the same file with the same bytes
  instead of adding a duplicate.

Single files given by a full URI (probe and expert weights, models) go through
:func:`atomic_write_bytes` and :func:`read_uri_bytes`, so the S3 endpoint rules live here only.
Readers skip names starting with ``.`` or ``_`` (temporary files, markers). Explicit Arrow
schemas for the tables the system shares are defined here too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import secrets
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_TIMESTAMP = pa.timestamp("us", tz="UTC")

TASKS_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("family", pa.string(), nullable=False),
        pa.field("data_uri", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("classes", pa.list_(pa.string()), nullable=False),
        pa.field("n_classes", pa.int32(), nullable=False),
        pa.field("n_train", pa.int32(), nullable=False),
        pa.field("n_test", pa.int32(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("updated_at", _TIMESTAMP),
    ]
)

EXPERTS_SCHEMA = pa.schema(
    [
        pa.field("expert_id", pa.string(), nullable=False),
        pa.field("source_task_id", pa.string()),  # null for the generic expert
        pa.field("arch", pa.string(), nullable=False),
        pa.field("weights_uri", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("updated_at", _TIMESTAMP),
    ]
)

EMBEDDINGS_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("probe", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("n_samples", pa.int32()),
        pa.field("created_at", _TIMESTAMP),
    ]
)

MATRIX_SCHEMA = pa.schema(
    [
        pa.field("task_id", pa.string(), nullable=False),
        pa.field("expert_id", pa.string(), nullable=False),
        pa.field("test_error", pa.float64()),
        pa.field("train_error", pa.float64()),
        pa.field("n_train", pa.int32()),
        pa.field("epochs", pa.int32()),
        pa.field("config", pa.string()),  # JSON: recipe, seed, code version
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("trials", pa.int32()),
        pa.field("gpu_seconds", pa.float64()),
    ]
)


def redact_uri(uri: str) -> str:
    """The URI with any ``user:password@`` part removed, safe to log."""
    parts = urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def _s3_endpoint() -> str | None:
    # The service-specific variable wins, as in botocore's own configuration rules.
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def is_local(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path to use with it.

    Local paths become absolute. For ``s3://`` the endpoint comes from ``AWS_ENDPOINT_URL_S3``
    or ``AWS_ENDPOINT_URL`` (MinIO, moto, on-prem S3); credentials are left to the usual AWS
    chain and never pass through this module. Directory listings are not cached, because other
    processes write to the same prefixes.
    """
    uri = str(uri)
    if is_local(uri):
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))
    scheme = urlsplit(uri).scheme
    if scheme in ("s3", "s3a"):
        import s3fs

        client_kwargs = {}
        endpoint = _s3_endpoint()
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)
        return fs, uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def _put_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, local: bool) -> None:
    """Locally: a hidden temporary file in the target directory, then ``os.replace``. On object
    stores one PUT below ~100 MB, multipart above: both publish the object only at the end."""
    if not local:
        fs.pipe_file(path, bytes(data))
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # Created as open() would create it (0o666 less the umask, which the kernel applies), not
    # mkstemp's 0600: other users of a shared root must read the zoo.
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(uri: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to a single file (local path or URI) so that readers see the old file or
    the whole new one, never a part. Returns the URI written (local paths made absolute)."""
    fs, path = filesystem_for(str(uri))
    local = is_local(str(uri))
    _put_atomic(fs, path, data, local=local)
    return path if local else str(uri)


def read_uri_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The bytes of one file given by a local path or URI (``s3://`` with the endpoint rules of
    :func:`filesystem_for`). A missing file raises :class:`FileNotFoundError` naming the
    (redacted) URI; other read failures are :class:`OSError`."""
    fs, path = filesystem_for(str(uri))
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such file: {redact_uri(str(uri))}") from exc


def _is_hidden(name: str) -> bool:
    base = posixpath.basename(name.rstrip("/"))
    return base.startswith(".") or base.startswith("_")


def _hive_values(rel_dir: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for seg in rel_dir.split("/"):
        if "=" in seg:
            key, value = seg.split("=", 1)
            out[key] = value
    return out


def table_to_bytes(table: pa.Table) -> bytes:
    """Parquet bytes of ``table``; the same table always gives the same bytes."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def key_hash(table: pa.Table, key_columns: Sequence[str]) -> str:
    """A stable hash of the sorted key values of ``table`` (names a part file)."""
    missing = [c for c in key_columns if c not in table.column_names]
    if missing:
        raise KeyError(f"key columns {missing} not in table columns {table.column_names}")
    rows = sorted(zip(*(table.column(c).to_pylist() for c in key_columns), strict=True))
    payload = json.dumps([list(key_columns), rows], default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with the columns of ``schema`` in its order and types (missing nullable
    columns filled with nulls); raises on a missing required column or a failed cast."""
    arrays = []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            arrays.append(pa.nulls(table.num_rows, field.type))
        else:
            raise KeyError(f"required column {field.name!r} missing")
    return pa.Table.from_arrays(arrays, schema=schema)


class StorageRoot:
    """Everything the system stores lives under one root; paths given to methods are
    relative to it (``"zoo/tasks.parquet"``)."""

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri = str(uri).rstrip("/") or "/"
        self.fs, self.path = filesystem_for(self.uri)
        self.local = is_local(self.uri)
        if self.local:
            self.uri = self.path

    def __repr__(self) -> str:
        return f"StorageRoot({redact_uri(self.uri)!r})"

    # -- paths -------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        """Full URI of a path under the root."""
        rel = (
            posixpath.join(*[str(p).strip("/") for p in parts if str(p).strip("/")])
            if parts
            else ""
        )
        return f"{self.uri}/{rel}" if rel else self.uri

    def _abs(self, rel: str) -> str:
        rel = str(rel).strip("/")
        return f"{self.path}/{rel}" if rel else self.path

    def _rel(self, abs_path: str) -> str:
        prefix = self.path.rstrip("/") + "/"
        abs_path = abs_path if self.local else abs_path.split("://", 1)[-1]
        return abs_path[len(prefix) :] if abs_path.startswith(prefix) else abs_path

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._abs(rel))

    def list(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Sorted relative paths of the files (and, if not recursive, subdirectories) under
        ``rel``; empty if it does not exist. Hidden names are left out."""
        base = self._abs(rel)
        if not self.fs.exists(base):
            return []
        if recursive:
            names = self.fs.find(base)
        else:
            names = self.fs.ls(base, detail=False)
        rels = [self._rel(n) for n in names]
        rels = [
            r for r in rels if r != rel.strip("/") and not any(_is_hidden(s) for s in r.split("/"))
        ]
        return sorted(rels)

    # -- bytes -------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self._abs(rel))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no such file: {redact_uri(self.join(rel))}") from exc

    def write_bytes_atomic(self, rel: str, data: bytes) -> str:
        """Write ``data`` so that readers see the old file or the whole new one, never a part.
        Returns the full URI."""
        _put_atomic(self.fs, self._abs(rel), data, local=self.local)
        return self.join(rel)

    # -- tables ------------------------------------------------------------------------
    def write_table_atomic(self, rel: str, table: pa.Table) -> str:
        return self.write_bytes_atomic(rel, table_to_bytes(table))

    def write_part(self, dataset_rel: str, table: pa.Table, key_columns: Sequence[str]) -> str:
        """Write ``table`` as ``<dataset_rel>/part-<hash of its key values>.parquet``.

        Rows are sorted by the key columns first, so the same rows give the same file name and
        the same bytes whatever their order; an identical existing part is left untouched.
        Returns the part's path relative to the root.
        """
        if table.num_rows == 0:
            raise ValueError(f"refusing to write an empty part under {dataset_rel!r}")
        table = table.sort_by([(c, "ascending") for c in key_columns])
        rel = f"{dataset_rel.strip('/')}/part-{key_hash(table, key_columns)}.parquet"
        data = table_to_bytes(table)
        if self.exists(rel):
            if self.read_bytes(rel) == data:
                log.debug("part %s already written", rel)
                return rel
            log.info("replacing part %s with new values for the same keys", rel)
        self.write_bytes_atomic(rel, data)
        return rel

    def _part_files(self, base: str) -> list[str]:
        files = [
            f
            for f in self.fs.find(base)
            if f.endswith(".parquet") and not any(_is_hidden(s) for s in self._rel(f).split("/"))
        ]
        return sorted(files)

    def read_table(
        self, rel: str, schema: pa.Schema | None = None, columns: Iterable[str] | None = None
    ) -> pa.Table:
        """Read one Parquet file, or every ``*.parquet`` under a directory. Hive partition
        segments of the path below the root (``probe=x``) become string columns. With ``schema`` the result is
        conformed to it, and an empty directory gives an empty table of that schema."""
        base = self._abs(rel)
        if not self.fs.exists(base):
            raise FileNotFoundError(f"no such table: {redact_uri(self.join(rel))}")
        cols = list(columns) if columns is not None else None
        files = [base] if self.fs.isfile(base) else self._part_files(base)
        tables = [
            self._read_file(source, cols, _hive_values(posixpath.dirname(self._rel(f))))
            for f, source in zip(files, self._sources(files), strict=True)
        ]
        if not tables:
            if schema is None:
                return pa.table({})
            return schema.empty_table()
        table = (
            tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        )
        if schema is not None:
            table = conform(
                table, schema if cols is None else pa.schema([schema.field(c) for c in cols])
            )
        return table

    def _sources(self, files: list[str]) -> list:
        """What to open for each file: local paths as they are; remote files fetched in one
        concurrent batch, since a dataset keyed by task has one small object per key and
        fetching them one by one would cost a round trip each."""
        if self.local or len(files) < 2:
            return files
        fetched = self.fs.cat(files, on_error="raise")
        return [pa.BufferReader(fetched[f if f in fetched else f.split("://", 1)[-1]])
                for f in files]

    def _read_file(self, source, columns: list[str] | None, hive: dict[str, str]) -> pa.Table:
        wanted = [c for c in columns if c not in hive] if columns else None
        if isinstance(source, pa.BufferReader):
            table = pq.read_table(source, columns=wanted)
        else:
            with self.fs.open(source, "rb") as f:
                table = pq.read_table(f, columns=wanted)
        for key, value in hive.items():
            if key not in table.column_names and (columns is None or key in columns):
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        return table
