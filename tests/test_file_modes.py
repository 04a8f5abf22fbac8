"""Files written atomically under a local root get the mode any other file would get (0o666
less the umask), so a zoo on a shared disk is readable by the group when the umask says so."""

from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from t2v_core.storage import StorageRoot


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    root = StorageRoot(tmp_path / "zoo")
    root.write_bytes_atomic("raw/blob.bin", b"abc")
    root.write_table_atomic("zoo/tasks.parquet", pa.table({"x": [1, 2]}))
    part = root.write_part("rows", pa.table({"k": ["a"], "v": [1.0]}), ["k"])
    for rel in ("raw/blob.bin", "zoo/tasks.parquet", part):
        assert _mode(tmp_path / "zoo" / rel) == expected, rel
    assert root.read_bytes("raw/blob.bin") == b"abc"


def test_replacing_a_file_gives_the_new_one_the_current_mode(tmp_path, umask):
    root = StorageRoot(tmp_path)
    umask(0o077)
    root.write_bytes_atomic("f.bin", b"old")
    umask(0o022)
    root.write_bytes_atomic("f.bin", b"new")
    assert _mode(tmp_path / "f.bin") == 0o644
    assert root.read_bytes("f.bin") == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temporary file left
