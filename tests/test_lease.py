"""The refresh lease: one holder at a time, on a local root and on S3 (a moto server).

Simultaneous acquirers are raced on the local store, whose exclusive create is atomic. moto's
server checks an S3 condition and stores the object without a lock between the two, so a race
against it would test moto, not S3; on S3 the tests check instead that every write is
conditional (a live lease written by someone else is never overwritten, a stale version is
refused).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from t2v_core.lease import (
    LEASE_DIR,
    Lease,
    LeaseError,
    LeaseHeld,
    LeaseLost,
    LeaseRecord,
    RefreshLease,
    _store_for,
)
from t2v_core.storage import StorageRoot

REPO = Path(__file__).resolve().parents[1]
T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> StorageRoot:
    if request.param == "local":
        return StorageRoot(tmp_path / "zoo")
    moto_s3 = request.getfixturevalue("moto_s3")
    return StorageRoot(f"s3://{moto_s3.bucket}/lease-{uuid.uuid4().hex[:8]}")


def _foreign_lease(root: StorageRoot, owner: str, expires: float) -> LeaseRecord:
    """A lease written straight into the store, as another machine would have left it."""
    record = LeaseRecord(owner=owner, host="other-host", pid=4242, token="f" * 32,
                         started="2026-01-05T03:00:00.000+00:00",
                         expires=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(expires)))
    root.write_bytes_atomic(f"{LEASE_DIR}/refresh.json", record.to_bytes())
    return record


def test_a_held_lease_refuses_a_second_holder_and_names_the_first(root):
    first = RefreshLease(root, owner="refresh_zoo", ttl_s=60, renew_every_s=0)
    with first:
        with pytest.raises(LeaseHeld) as held:
            RefreshLease(root, owner="hand-submitted", ttl_s=60).acquire()
        assert held.value.holder == first.record
        assert held.value.expires == first.record.expires_at
        message = str(held.value)
        assert "'refresh_zoo'" in message and first.record.expires in message
        assert first.record.host in message and str(first.record.pid) in message
    assert Lease(root, owner="x").holder() is None


def test_a_live_lease_written_elsewhere_is_never_overwritten(root):
    theirs = _foreign_lease(root, "scheduled-refresh", expires=time.time() + 600)
    with pytest.raises(LeaseHeld, match="'scheduled-refresh' \\(host other-host, pid 4242\\)"):
        RefreshLease(root, owner="me").acquire()
    assert Lease(root, owner="me").holder() == theirs


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_touch_it(root):
    clock = Clock()
    old = RefreshLease(root, owner="crashed", ttl_s=10, renew_every_s=0, clock=clock)
    old.acquire()
    clock.now = T0 + 9
    with pytest.raises(LeaseHeld):
        RefreshLease(root, owner="new", ttl_s=10, renew_every_s=0, clock=clock).acquire()
    clock.now = T0 + 11
    new = RefreshLease(root, owner="new", ttl_s=10, renew_every_s=0, clock=clock)
    taken = new.acquire()
    assert new.holder() == taken and taken.owner == "new"
    with pytest.raises(LeaseLost, match="taken over or removed"):
        old.renew()
    assert old.release() is False
    assert new.holder() == taken
    assert new.release() is True
    assert new.holder() is None


def test_renew_extends_the_expiry_in_the_store(root):
    clock = Clock()
    lease = RefreshLease(root, owner="refresh_zoo", ttl_s=30, renew_every_s=0, clock=clock)
    first = lease.acquire()
    assert first.expires_at.timestamp() == T0 + 30
    clock.now = T0 + 25
    renewed = lease.renew()
    assert renewed.expires_at.timestamp() == T0 + 55
    assert renewed.token == first.token and renewed.started == first.started
    assert lease.holder() == renewed
    clock.now = T0 + 40  # the old expiry has passed, the renewed one has not
    with pytest.raises(LeaseHeld):
        RefreshLease(root, owner="other", ttl_s=30, clock=clock).acquire()
    lease.release()


def test_release_removes_the_lease_so_the_next_run_can_take_it(root):
    with RefreshLease(root, owner="first", renew_every_s=0) as lease:
        assert lease.held
    assert not lease.held and lease.holder() is None
    with RefreshLease(root, owner="second", renew_every_s=0) as second:
        assert second.holder().owner == "second"


def test_the_background_thread_renews_while_the_run_lasts(root):
    with RefreshLease(root, owner="refresh_zoo", ttl_s=0.6) as lease:  # renews every 0.2 s
        first = lease.record
        time.sleep(0.9)
        lease.check()
        now = lease.holder()
        assert now.token == first.token
        assert now.expires_at > first.expires_at
        assert time.time() < now.expires_at.timestamp()


def test_check_reports_a_lease_that_was_taken_away(root):
    lease = RefreshLease(root, owner="refresh_zoo", ttl_s=0.6)
    lease.acquire()
    _foreign_lease(root, "intruder", expires=time.time() + 600)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            lease.check()
        except LeaseLost:
            break
        time.sleep(0.05)
    else:
        pytest.fail("check() did not notice that the lease was replaced")
    assert lease.release() is False
    assert lease.holder().owner == "intruder"


def test_replace_and_delete_refuse_a_stale_version(root):
    store = _store_for(root, f"{LEASE_DIR}/cas.json")
    first = store.create(b"one")
    assert first is not None and store.create(b"again") is None
    second = store.replace(b"two", first)
    assert second is not None and second != first
    assert store.replace(b"three", first) is None
    assert store.delete(first) is False
    assert store.read() == (b"two", second)
    assert store.delete(second) is True and store.read() is None
    assert store.replace(b"four", second) is None


@pytest.mark.parametrize("left_behind", [False, True], ids=["free", "expired"])
def test_threads_racing_for_the_lease_leave_exactly_one_holder(tmp_path, left_behind):
    root = StorageRoot(tmp_path)
    for _ in range(5):
        if left_behind:
            _foreign_lease(root, "crashed", expires=time.time() - 1)
        leases = [RefreshLease(root, owner=f"racer-{i}", renew_every_s=0) for i in range(8)]
        barrier = threading.Barrier(len(leases))
        outcomes: dict[str, object] = {}

        def race(lease, barrier=barrier, outcomes=outcomes):
            barrier.wait()
            try:
                outcomes[lease.owner] = lease.acquire()
            except LeaseHeld as exc:
                outcomes[lease.owner] = exc

        threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcomes.values() if isinstance(o, LeaseRecord)]
        assert len(winners) == 1, outcomes
        losers = [o for o in outcomes.values() if isinstance(o, LeaseHeld)]
        assert len(losers) == 7 and all(e.holder == winners[0] for e in losers)
        next(lease for lease in leases if lease.held).release()


def test_a_lease_held_by_another_process_names_its_pid(tmp_path):
    holder = (
        "import sys; from t2v_core.lease import RefreshLease\n"
        f"lease = RefreshLease({str(tmp_path)!r}, owner='child', ttl_s=60)\n"
        "lease.acquire(); print('held', flush=True); sys.stdin.read(); lease.release()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", holder], cwd=REPO, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld) as held:
            RefreshLease(tmp_path, owner="parent").acquire()
        assert held.value.holder.pid == child.pid and held.value.holder.owner == "child"
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    with RefreshLease(tmp_path, owner="parent", renew_every_s=0) as lease:
        assert lease.holder().owner == "parent"


def test_bad_lease_content_and_arguments_are_clear_errors(tmp_path):
    root = StorageRoot(tmp_path)
    root.write_bytes_atomic(f"{LEASE_DIR}/refresh.json", b"{not json")
    with pytest.raises(LeaseError, match="not a valid lease.*delete it"):
        RefreshLease(root, owner="me").acquire()
    with pytest.raises(ValueError, match="lease name"):
        Lease(root, "../escape", owner="me")
    with pytest.raises(ValueError, match="owner"):
        Lease(root, owner="")
    with pytest.raises(ValueError, match="ttl_s"):
        Lease(root, owner="me", ttl_s=0)
    with pytest.raises(LeaseError, match="conditional writes"):
        Lease("memory://zoo", owner="me")
    with Lease(root, "other", owner="me", renew_every_s=0) as lease:
        with pytest.raises(LeaseError, match="already held"):
            lease.acquire()
