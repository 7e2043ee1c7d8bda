"""Files binax writes and reads back: written atomically, read with one-line errors.

A file is written whole or not at all: the text goes to a temporary file in the same
directory, is flushed to disk (``fsync``) and renamed over the target (``os.replace``, atomic
on POSIX), and the directory is synced so the rename itself survives a power cut. A process
killed at any point therefore leaves either the old file or the new one, never an empty or
half-written one. An append (a history file) rewrites the whole file the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, BinaryIO, Callable

from binax.errors import WorkdirError

__all__ = ["write_with", "write_text", "write_json", "append_line", "read_json"]

# The process's umask, read once at import (reading it means setting it): the temporary
# file is created 0600, and the file it becomes gets the mode open() would have given it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and some platforms) cannot sync a directory
        pass
    finally:
        os.close(fd)


def write_with(path: str | os.PathLike, write_fn: Callable[[BinaryIO], Any], *, make_dirs: bool = False) -> int:
    """Replaces ``path`` with what ``write_fn(file)`` writes to a binary file, atomically
    (temporary file in the same directory, fsync, ``os.replace``, directory fsync); the
    directory is created first when ``make_dirs``. Returns the size in bytes."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs:
        os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)
    return os.path.getsize(path)


def write_text(path: str, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically (:func:`write_with`)."""
    data = text.encode()
    write_with(path, lambda f: f.write(data))


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
    """``json.dump(obj)`` into ``path``, atomically (``dump_kwargs`` as for ``json.dumps``)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}) + "\n")


def append_line(path: str, line: str) -> None:
    """Appends one line to ``path`` by rewriting it atomically: a kill leaves the old
    lines or all of them, never a torn one."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    if old and not old.endswith("\n"):
        old += "\n"
    write_text(path, old + line.rstrip("\n") + "\n")


def read_json(path: str, what: str) -> Any:
    """The JSON value in ``path``; a file that is not JSON raises
    :class:`~binax.errors.WorkdirError` naming the path and ``what`` the file is for."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} is damaged (not JSON: {e}); it holds {what}") from None
