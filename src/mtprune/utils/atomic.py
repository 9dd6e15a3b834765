"""Atomic writes: write a temporary file in the same folder, fsync, then rename over the target.

A reader therefore sees either the old file or the complete new one, never a half-written file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only folder, a file where a folder should be: name the target
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError of its zip writer
            if not _is_write_failure(err):
                raise
            raise _write_error(path, err) from err
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as err:  # name the file being written, not its temporary
        if err.filename == str(path):
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _is_write_failure(err: RuntimeError) -> bool:
    text = str(err)
    return "inline_container" in text or "PytorchStreamWriter" in text or "file write failed" in text


def _write_error(path: Path, err: RuntimeError) -> OSError:
    """An ``OSError`` naming ``path`` for a write that failed inside a library: ENOSPC when the file system is
    (nearly) full, else EIO with the library's first line."""
    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    first = (str(err).splitlines() or ["write failed"])[0]
    return OSError(errno.EIO, f"write failed ({first})", str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically (e.g. ``torch.save``)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one complete line with a single write and fsync (a JSONL record is never split)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:  # name the file (os.write's errors carry no file name)
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that writes killed mid-way left in ``folder``.

    Called when a run resumes: a SIGKILL between ``mkstemp`` and the rename leaves such a file behind. Returns
    the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = []
    for path in found:
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
