"""Atomic file writes: a reader (or a crash) never sees half a file, nor half a set of files.

Every writer in meshserve (traces, checkpoints, plots, results) goes through here. Commands that
write several files wrap their writes in ``all_or_nothing()`` so a failure leaves none of them, and
call ``check_writable`` on their output paths before starting work that takes minutes.
"""

from __future__ import annotations

import contextvars
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from meshserve.errors import InputError

# What meshserve writes; a results folder named like one of these is almost surely a mistake.
FILE_SUFFIXES = (".png", ".json", ".csv", ".parquet", ".npz", ".safetensors")
# Renames held back by an enclosing all_or_nothing() block: (temporary file, final path).
_pending: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "meshserve_atomic_pending", default=None
)


def _file_mode() -> int:
    """What open() would give a new file: 0o666 less the umask (mkstemp's 0o600 hides results)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was. Inside
    ``all_or_nothing()`` the rename waits until that whole block succeeds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _file_mode())
    pending = _pending.get()
    try:
        yield Path(tmp)
        if pending is None:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if pending is not None:
        pending.append((Path(tmp), path))


@contextmanager
def all_or_nothing() -> Iterator[None]:
    """Every atomic write inside the block lands together when it succeeds; none lands when it fails."""
    if _pending.get() is not None:  # nested: the outer block decides
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _pending.set(pending)
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        _pending.reset(token)
    for tmp, path in pending:
        os.replace(tmp, path)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def check_writable(path: str | os.PathLike[str], field: str, *, folder: bool = False) -> Path:
    """Fail now, not after the work, when ``path`` (a file, or a folder if ``folder``) cannot be written.

    Probes the nearest existing folder with a temporary file, so nothing is left behind either way.
    """
    path = Path(path)
    if folder and not path.is_dir() and path.suffix.lower() in FILE_SUFFIXES:
        raise InputError(field, f"names a folder for the results, got a file name {str(path)!r}")
    if path.exists() and path.is_dir() != folder:
        raise InputError(
            field,
            f"{path} is {'a file' if folder else 'a folder'}; expected a "
            f"{'folder' if folder else 'file'} path",
        )
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(field, f"cannot write under {path}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise InputError(field, f"cannot write under {existing} ({err.strerror or err})") from None
    return path
