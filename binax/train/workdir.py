"""One run per workdir: an exclusive lock held for as long as a run writes there.

Two runs in one workdir would interleave their checkpoints and metric records and leave
the workdir describing neither. :func:`lock_workdir` takes an exclusive ``flock`` on
``workdir/.binax.lock`` and writes who holds it into the file; a second run fails at
once with that description. The kernel drops the lock when the holder exits, however it
exits, so a run killed with SIGKILL leaves no stale lock behind (the file stays; only the
lock counts).

:func:`usable_workdir` and :func:`environment_error` turn what the file system refuses
(permissions, a read-only disk, a full disk, a file where a directory should be, a
symlink loop, an over-long name) into one line naming the path.

Nested use in one process (a recipe's stages in sub-workdirs of a locked workdir, or a
library call inside a locked command) is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Iterator

from binax.errors import BinaxError, DiskFullError, WorkdirBusyError, WorkdirError

__all__ = [
    "LOCK_NAME", "lock_workdir", "check_not_busy", "holder_of", "usable_workdir", "environment_error",
    "environment_errors",
]

LOCK_NAME = ".binax.lock"
_HELD: dict[str, int] = {}  # absolute workdir -> file descriptor of its lock


def _held_here(path: str) -> bool:
    """Whether this process holds the lock of ``path`` or of a directory above it."""
    return any(path == held or path.startswith(held + os.sep) for held in _HELD)


# errno -> what it means for a workdir; every other OSError is a bug and keeps its traceback.
_ENVIRONMENT = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file is in the way of a directory",
    errno.ELOOP: "the path is a loop of symbolic links",
    errno.ENAMETOOLONG: f"a name is too long (at most {os.pathconf('/', 'PC_NAME_MAX')} bytes a name here)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EIO: "an input/output error (a failing disk or network file system)",
}


def environment_error(e: OSError, workdir: str) -> BinaxError | None:
    """The one-line error for an ``OSError`` the file system raised around ``workdir``
    (:class:`~binax.errors.DiskFullError` for a full disk, else
    :class:`~binax.errors.WorkdirError`), or None when ``e`` is not about the environment."""
    path = e.filename or workdir
    if e.errno == errno.ENOSPC:
        error = DiskFullError(
            f"no space left on device while writing {path} (workdir {workdir}). Free some space and rerun "
            "the same command to resume."
        )
        error.errno = errno.ENOSPC
        return error
    what = _ENVIRONMENT.get(e.errno)
    if what is None:
        return None
    error = WorkdirError(f"cannot use {path} (workdir {workdir}): {what}. Fix that or pass another --workdir.")
    error.errno = e.errno  # (not filename: OSError would then print itself as "[Errno n] ...")
    return error


@contextlib.contextmanager
def environment_errors(workdir: str) -> Iterator[None]:
    """Re-raises an ``OSError`` about the environment as its one-line :func:`environment_error`;
    binax's own errors and other ``OSError``s pass unchanged."""
    try:
        yield
    except BinaxError:
        raise
    except OSError as e:
        error = environment_error(e, workdir)
        if error is None:
            raise
        raise error from e


def usable_workdir(workdir: str) -> None:
    """Checks, without creating anything, that ``workdir`` is a directory or can become one.

    Raises :class:`~binax.errors.WorkdirError` for a file in its place and the file
    system's ``OSError`` (see :func:`environment_error`) for a link it cannot resolve; a
    path that cannot be created fails when the lock creates it, with the same errors.
    """
    if os.path.lexists(workdir):
        os.stat(workdir)  # a symlink loop or a dangling link: the file system's own error
        if not os.path.isdir(workdir):
            raise WorkdirError(f"workdir {workdir} is a file, not a directory; pass another --workdir.")


def holder_of(lock_path: str) -> str:
    """A description of the process that wrote ``lock_path`` (for the error message)."""
    try:
        with open(lock_path) as f:
            info = json.load(f)
        return (
            f"process {info['pid']} on {info['host']} (started {info['started']}: "
            f"{' '.join(info['argv'])[:200]})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def check_not_busy(workdir: str) -> None:
    """Raises :class:`~binax.errors.WorkdirBusyError` when another process holds
    ``workdir``'s lock; creates and writes nothing (a probe before the config is compared)."""
    path = os.path.abspath(workdir)
    lock_path = os.path.join(path, LOCK_NAME)
    if _held_here(path) or not os.path.exists(lock_path):
        return
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _busy(path, lock_path) from None
    finally:
        os.close(fd)


def _busy(path: str, lock_path: str) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"workdir {path} is in use by {holder_of(lock_path)}. Wait for that run to finish "
        "(or stop it; it resumes from its checkpoint) or pass another --workdir."
    )


@contextlib.contextmanager
def lock_workdir(workdir: str, *, enabled: bool = True) -> Iterator[None]:
    """Holds ``workdir``'s lock for the ``with`` block; creates the directory.

    Raises :class:`~binax.errors.WorkdirBusyError` naming the running process when
    another process holds it. ``enabled=False`` (every process of a multi-process run but
    the first) does nothing.
    """
    path = os.path.abspath(workdir)
    if not enabled or _held_here(path):
        yield
        return
    os.makedirs(path, exist_ok=True)
    lock_path = os.path.join(path, LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise _busy(path, lock_path) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": [os.path.basename(sys.executable), *sys.argv],
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD[path] = fd
    try:
        yield
    finally:
        del _HELD[path]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
