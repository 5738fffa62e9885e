"""Atomic writes: the file is either the old one or the whole new one, never half, never a stray temp."""

import os
import stat

import pytest

from meshserve.atomic import all_or_nothing, atomic_path, check_writable, write_atomic
from meshserve.errors import InputError


def test_write_atomic_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_written_files_get_normal_permissions_not_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "result.json", b"{}")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_all_or_nothing_lands_every_file_or_none(tmp_path):
    with all_or_nothing():
        write_atomic(tmp_path / "a.json", b"a")
        write_atomic(tmp_path / "b.png", b"b")
        assert not (tmp_path / "a.json").exists()  # held back until the block succeeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
    with pytest.raises(KeyboardInterrupt), all_or_nothing():
        write_atomic(tmp_path / "a.json", b"new a")
        write_atomic(tmp_path / "c.csv", b"c")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
    assert (tmp_path / "a.json").read_bytes() == b"a"


def test_check_writable_refuses_paths_that_cannot_be_written_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for path, folder in [
        (blocker / "out.png", False),
        (blocker / "sub" / "dir", True),
        (tmp_path, False),
        (blocker, True),
        (tmp_path / "results.csv", True),
    ]:
        with pytest.raises(InputError) as err:
            check_writable(path, "out", folder=folder)
        assert err.value.field == "out"
    fresh = tmp_path / "new" / "deeper" / "x.png"
    assert check_writable(fresh, "out") == fresh
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
