"""A local root that cannot be written (a file where a folder should be, no permission, a full
disk) gives a clear error; what was stored stays readable, no partial file is left visible,
and a re-run once the cause is gone completes without duplicating anything."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import TASKS_MANIFEST, read_tasks
from t2v_core.zoo.register import register_folders

SIZE = 12
CLASSES = {"cat": 3, "dog": 3}


def _files(folder: Path) -> list[str]:
    """Every file under ``folder``, hidden ones too, relative and sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _tasks(base: Path, image_folder, *names: str) -> Path:
    for i, name in enumerate(names):
        image_folder(base, name, CLASSES, {"cat": 1, "dog": 1}, seed=i, size=SIZE)
    return base


# -- a file where the root's folder should be ----------------------------------------------------
def test_root_below_a_file_fails_naming_the_path_and_touches_nothing(tmp_path, image_folder):
    # Works as root too, which ignores permission bits.
    tasks = _tasks(tmp_path / "tasks", image_folder, "ant")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    root = notes / "zoo"
    with pytest.raises(NotADirectoryError, match=f"Not a directory: '{root}"):
        register_folders(str(tasks), str(root))
    assert notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tasks"]

    good = tmp_path / "zoo"
    assert register_folders(str(tasks), str(good)).registered == ("ant",)
    assert register_folders(str(tasks), str(good)).upsert.unchanged == ("ant",)


# -- no permission -------------------------------------------------------------------------------
def _permission_bits_apply(tmp_path: Path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, which writes into a read-only folder anyway."""
    probe = tmp_path / "read-only"
    probe.mkdir(mode=0o555)
    try:
        (probe / "x").touch()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o755)
    return False


def _chattr(flag: str, folder: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(folder)], capture_output=True,
                          check=False).returncode == 0


@contextlib.contextmanager
def _unwritable(folder: Path, tmp_path: Path) -> Iterator[None]:
    """``folder`` refuses new files for the block: read-only permission bits, or for root
    (which ignores them) the immutable attribute (``chattr +i``), which binds root too."""
    if _permission_bits_apply(tmp_path):
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
        try:
            yield
        finally:
            folder.chmod(0o755)
    elif _chattr("+i", folder):
        try:
            yield
        finally:
            _chattr("-i", folder)
    else:
        pytest.skip("this user writes into read-only folders and cannot set chattr +i")


def test_read_only_root_fails_clearly_and_keeps_the_manifest(tmp_path, image_folder):
    tasks = _tasks(tmp_path / "tasks", image_folder, "ant")
    root = tmp_path / "root"
    register_folders(str(tasks), str(root))
    before = _files(root)
    manifest = (root / TASKS_MANIFEST).read_bytes()
    _tasks(tasks, image_folder, "ant", "bee")
    zoo_dir = root / "zoo"
    with _unwritable(zoo_dir, tmp_path):
        with pytest.raises(PermissionError, match=str(zoo_dir)):
            register_folders(str(tasks), str(root))
        assert _files(root) == before
        assert (root / TASKS_MANIFEST).read_bytes() == manifest
    assert register_folders(str(tasks), str(root)).upsert.added == ("bee",)
    assert [t.task_id for t in read_tasks(root)] == ["ant", "bee"]


# -- a full disk ---------------------------------------------------------------------------------
def _part(first_key: int, rows: int) -> pa.Table:
    """Rows whose values do not compress, so the Parquet file is about 8 bytes a row."""
    keys = np.arange(first_key, first_key + rows)
    return pa.table({"k": keys, "v": np.random.default_rng(first_key).random(rows)})


def _write_until_full(folder: Path, make_room: Callable[[], None]) -> None:
    """A small part lands, a large one hits the full disk, then room is made and the same
    two writes are run again."""
    root = StorageRoot(folder)
    small, large = _part(0, 100), _part(1000, 80_000)  # ~1 KB and ~640 KB
    first = root.write_part("rows", small, ["k"])
    kept = (folder / first).read_bytes()
    with pytest.raises(OSError) as err:
        root.write_part("rows", large, ["k"])
    assert err.value.errno in (28, 27)  # ENOSPC, EFBIG
    assert _files(folder) == [first]  # no partial file, visible or hidden
    assert (folder / first).read_bytes() == kept
    assert root.read_table("rows").num_rows == 100

    make_room()
    parts = [root.write_part("rows", t, ["k"]) for t in (small, large)]
    assert parts[0] == first and (folder / first).read_bytes() == kept
    assert _files(folder) == sorted(parts)
    keys = root.read_table("rows").column("k").to_pylist()
    assert sorted(keys) == list(range(100)) + list(range(1000, 81_000))  # each row once


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.skipif(shutil.which("mount") is None or os.geteuid() != 0,
                    reason="mounting a small tmpfs needs root and mount(8)")
def test_full_disk_keeps_what_was_written_and_a_rerun_completes(tmp_path):
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        filler = disk / "filler.bin"
        filler.write_bytes(os.urandom(500 * 1024))  # 1 MB disk: 640 KB more cannot fit
        _write_until_full(disk / "root", filler.unlink)


def test_file_size_limit_keeps_what_was_written_and_a_rerun_completes(tmp_path):
    # RLIMIT_FSIZE fails a write part-way (EFBIG) as a full disk does, without root.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        _write_until_full(tmp_path / "root",
                          lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
