"""One run per workdir: an exclusive lock held for as long as a run writes there.

Two runs in one workdir would interleave their checkpoints and metric records and leave
the workdir describing neither. :func:`lock_workdir` takes an exclusive ``flock`` on
``workdir/.binax.lock`` and writes who holds it into the file; a second run fails at
once with that description. The kernel drops the lock when the holder exits, however it
exits, so a run killed with SIGKILL leaves no stale lock behind (the file stays; only the
lock counts).

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

from binax.errors import WorkdirBusyError

__all__ = ["LOCK_NAME", "lock_workdir", "holder_of"]

LOCK_NAME = ".binax.lock"
_HELD: dict[str, int] = {}  # absolute workdir -> file descriptor of its lock


def _held_here(path: str) -> bool:
    """Whether this process holds the lock of ``path`` or of a directory above it."""
    return any(path == held or path.startswith(held + os.sep) for held in _HELD)


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
        raise WorkdirBusyError(
            f"workdir {path} is in use by {holder_of(lock_path)}. Wait for that run to finish "
            "(or stop it; it resumes from its checkpoint) or pass another --workdir."
        ) from None
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
