"""Atomic writes: the file is either the old one or the whole new one, never half, never a stray temp."""

import pytest

from meshserve.atomic import atomic_path, write_atomic


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
