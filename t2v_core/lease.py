"""A lease in the storage root, so that only one refresh of a zoo runs at a time.

A scheduled refresh and a hand-submitted one may start together; both would embed the same
new tasks and fill the same matrix cells. The lease is one small JSON object,
``_leases/<name>.json`` under the root (hidden from listings), that says who holds it and until
when::

    {"owner": "refresh_zoo", "host": "ray-head-7f", "pid": 412, "token": "…",
     "started": "2026-01-05T03:00:00.000+00:00", "expires": "2026-01-05T03:15:00.000+00:00"}

Every change is a compare-and-swap on the store, so two writers never both believe they hold it:

* acquire creates the object only if it does not exist (S3: ``PUT`` with ``If-None-Match: *``;
  local: ``os.link`` of a finished temporary file, which fails if the name exists);
* renew, take-over of an expired lease and release replace or delete it only if it is still
  the version read before (S3: ``If-Match: <ETag>``; local: a comparison and ``os.replace``
  under an exclusive ``flock`` on a hidden guard file next to it).

Expiry is judged by the reader's clock against the holder's ``expires``; keep ``ttl_s`` well
above the clock skew between machines. A holder that renews (the default, every third of the
TTL) keeps it as long as it runs; one that dies leaves it to expire and be taken over.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import fsspec.asyn

from t2v_core.storage import StorageRoot, redact_uri

log = logging.getLogger(__name__)

LEASE_DIR = "_leases"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# S3 answers a failed condition with 412 PreconditionFailed, a concurrent conditional write
# with 409 ConditionalRequestConflict, and If-Match on a missing key with NoSuchKey.
_S3_CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                       "412", "409"}


class LeaseError(RuntimeError):
    """The lease could not be taken or kept."""


class LeaseHeld(LeaseError):
    """Another live holder has the lease; ``holder`` says who and ``expires`` until when."""

    def __init__(self, where: str, holder: LeaseRecord):
        self.holder = holder
        self.expires = holder.expires_at
        super().__init__(
            f"the lease {where} is held by {holder.owner!r} (host {holder.host}, pid "
            f"{holder.pid}) since {holder.started}, until {holder.expires}; wait for that run "
            "to finish or for the lease to expire"
        )


class LeaseLost(LeaseError):
    """The lease was taken over or removed while this holder thought it had it."""


@dataclass(frozen=True)
class LeaseRecord:
    """The content of a lease object."""

    owner: str
    host: str
    pid: int
    token: str  # unique per acquisition: tells this holder's lease from a later one
    started: str  # ISO 8601, UTC
    expires: str

    @property
    def expires_at(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.expires)

    def expired(self, now: float) -> bool:
        return self.expires_at.timestamp() <= now

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> LeaseRecord:
        try:
            record = cls(**json.loads(data))
            _ = record.expires_at  # parses the time, or raises
        except (ValueError, TypeError) as exc:
            raise LeaseError(
                f"the lease {where} is not a valid lease ({exc}); if no run holds it, delete it"
            ) from exc
        return record


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).isoformat(timespec="milliseconds")


class _LocalStore:
    """Compare-and-swap on a local (or shared POSIX) file; a version is the content's hash."""

    def __init__(self, path: str):
        self.path = path
        directory, base = os.path.split(path)
        self._guard_path = os.path.join(directory, f".{base}.guard")

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self._guard_path, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield

    def _write_temp(self, data: bytes) -> str:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, self._version(data)

    def create(self, data: bytes) -> str | None:
        with self._guarded():
            tmp = self._write_temp(data)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        return self._version(data)

    def _current_is(self, version: str) -> bool:
        current = self.read()
        return current is not None and current[1] == version

    def replace(self, data: bytes, version: str) -> str | None:
        with self._guarded():
            if not self._current_is(version):
                return None
            os.replace(self._write_temp(data), self.path)
        return self._version(data)

    def delete(self, version: str) -> bool:
        with self._guarded():
            if not self._current_is(version):
                return False
            os.unlink(self.path)
        return True


class _S3Store:
    """Compare-and-swap with S3 conditional requests; a version is the object's ETag."""

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key = fs.split_path(path)[:2]

    def _call(self, method: str, **kwargs) -> dict | None:
        """The response, or None when the store refused the request's condition."""
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except OSError as exc:
            response = getattr(exc.__cause__, "response", None) or {}
            if response.get("Error", {}).get("Code") in _S3_CONDITION_CODES:
                return None
            raise

    async def _get(self) -> tuple[bytes, str]:
        response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
        async with response["Body"] as body:
            return await body.read(), response["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        try:  # body and ETag from one GET, so they belong to the same version
            return fsspec.asyn.sync(self.fs.loop, self._get)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> str | None:
        response = self._call("put_object", Body=data, IfNoneMatch="*")
        return response and response["ETag"]

    def replace(self, data: bytes, version: str) -> str | None:
        response = self._call("put_object", Body=data, IfMatch=version)
        return response and response["ETag"]

    def delete(self, version: str) -> bool:
        return self._call("delete_object", IfMatch=version) is not None


def _store_for(root: StorageRoot, rel: str) -> _LocalStore | _S3Store:
    path = f"{root.path.rstrip('/')}/{rel}"
    if root.local:
        return _LocalStore(path)
    if hasattr(root.fs, "call_s3"):
        return _S3Store(root.fs, path)
    raise LeaseError(
        f"{redact_uri(root.uri)}: a lease needs a store with conditional writes "
        "(a local path or s3://)"
    )


class Lease:
    """One holder at a time for ``name`` under a storage root::

        with Lease(root, "refresh", owner="refresh_zoo", ttl_s=900) as lease:
            ...            # call lease.check() between steps to stop early if it was lost

    Entering raises :class:`LeaseHeld` while another live holder has it, and takes over an
    expired one. While held, a background thread renews it every ``renew_every_s`` seconds
    (a third of the TTL by default; ``0`` turns renewal off). Leaving releases it.
    """

    def __init__(
        self,
        root: StorageRoot | str,
        name: str = "refresh",
        *,
        owner: str,
        ttl_s: float = 900.0,
        renew_every_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if not _NAME.match(name):
            raise ValueError(f"lease name {name!r}: use letters, digits, '_', '.', '-'")
        if not owner:
            raise ValueError("a lease needs an owner that says who holds it")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.root = root if isinstance(root, StorageRoot) else StorageRoot(root)
        self.name, self.owner, self.ttl_s, self._clock = name, owner, float(ttl_s), clock
        self.renew_every_s = ttl_s / 3 if renew_every_s is None else float(renew_every_s)
        self.where = f"{name!r} under {redact_uri(self.root.uri)}"
        self._store = _store_for(self.root, f"{LEASE_DIR}/{name}.json")
        self._lock = threading.Lock()
        self._record: LeaseRecord | None = None
        self._version: str | None = None
        self._renewer: threading.Thread | None = None
        self._stop = threading.Event()
        self._renew_error: LeaseError | None = None

    @property
    def record(self) -> LeaseRecord | None:
        """What this holder last wrote (None when it does not hold the lease)."""
        return self._record

    @property
    def held(self) -> bool:
        return self._record is not None

    def holder(self) -> LeaseRecord | None:
        """The lease as it is in the store now (None when nobody holds it)."""
        current = self._store.read()
        return None if current is None else LeaseRecord.from_bytes(current[0], self.where)

    # -- taking and giving back ----------------------------------------------------------
    def acquire(self) -> LeaseRecord:
        """Take the lease, or take over an expired one; raises :class:`LeaseHeld`."""
        if self.held:
            raise LeaseError(f"the lease {self.where} is already held by this object")
        now = self._clock()
        mine = LeaseRecord(
            owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
            token=uuid.uuid4().hex, started=_iso(now), expires=_iso(now + self.ttl_s),
        )
        for _ in range(5):  # each round loses only to another writer that made progress
            version = self._store.create(mine.to_bytes())
            if version is None:
                version = self._take_over_if_expired(mine)
            if version is not None:
                self._hold(mine, version)
                return mine
        raise LeaseError(f"the lease {self.where} kept changing while taking it; try again")

    def _take_over_if_expired(self, mine: LeaseRecord) -> str | None:
        current = self._store.read()
        if current is None:
            return None  # released in between: try to create it again
        data, version = current
        theirs = LeaseRecord.from_bytes(data, self.where)
        if theirs.token == mine.token:
            return version  # our own create went through although its answer was lost
        if not theirs.expired(self._clock()):
            raise LeaseHeld(self.where, theirs)
        log.warning("taking over the lease %s from %s (host %s, pid %s), expired at %s",
                    self.where, theirs.owner, theirs.host, theirs.pid, theirs.expires)
        return self._store.replace(mine.to_bytes(), version)

    def _hold(self, record: LeaseRecord, version: str) -> None:
        self._record, self._version, self._renew_error = record, version, None
        log.info("holding the lease %s until %s", self.where, record.expires)
        if self.renew_every_s > 0:
            self._stop.clear()
            self._renewer = threading.Thread(
                target=self._renew_until_stopped, name=f"lease-{self.name}", daemon=True
            )
            self._renewer.start()

    def release(self) -> bool:
        """Give the lease back. Returns False when it was no longer this holder's (taken over
        after expiring), in which case the store is left as it is."""
        self._stop_renewing()
        with self._lock:
            if self._version is None:
                return False
            removed = self._store.delete(self._version)
            self._record = self._version = None
        if removed:
            log.info("released the lease %s", self.where)
        else:
            log.warning("the lease %s was no longer ours when released; left in place",
                        self.where)
        return removed

    # -- keeping it ------------------------------------------------------------------------
    def renew(self) -> LeaseRecord:
        """Push ``expires`` to now + TTL; raises :class:`LeaseLost` if it is no longer ours."""
        with self._lock:
            if self._record is None or self._version is None:
                raise LeaseLost(f"the lease {self.where} is not held by this object")
            renewed = replace(self._record, expires=_iso(self._clock() + self.ttl_s))
            version = self._store.replace(renewed.to_bytes(), self._version)
            if version is None:
                raise LeaseLost(
                    f"the lease {self.where} was taken over or removed; this run must stop"
                )
            self._record, self._version = renewed, version
        log.debug("renewed the lease %s until %s", self.where, renewed.expires)
        return renewed

    def check(self) -> None:
        """Raise :class:`LeaseLost` if renewing failed or the lease ran out: the caller should
        stop before writing more."""
        if self._renew_error is not None:
            raise self._renew_error
        record = self._record
        if record is None:
            raise LeaseLost(f"the lease {self.where} is not held by this object")
        if record.expired(self._clock()):
            raise LeaseLost(f"the lease {self.where} expired at {record.expires} (not renewed)")

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except LeaseLost as exc:
                log.error("%s", exc)
                self._renew_error = exc
                return
            except OSError as exc:  # a network error: the next round may get through
                log.warning("could not renew the lease %s: %s", self.where, exc)

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
        self._renewer = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class RefreshLease(Lease):
    """The lease a zoo refresh takes, so that a scheduled and a hand-submitted refresh of the
    same root never run together."""

    def __init__(self, root: StorageRoot | str, *, owner: str, ttl_s: float = 900.0,
                 renew_every_s: float | None = None, clock: Callable[[], float] = time.time):
        super().__init__(root, "refresh", owner=owner, ttl_s=ttl_s,
                         renew_every_s=renew_every_s, clock=clock)
