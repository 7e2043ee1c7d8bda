"""The errors binax raises for what a user asked for, as opposed to its own bugs.

Every class here derives from :class:`BinaxError` and from the built-in exception a
caller would otherwise catch (``ConfigError`` is a ``ValueError``, ``MissingDataError`` a
``FileNotFoundError``...), so ``except ValueError`` keeps working. The command-line entry
points print a ``BinaxError``'s message alone, without a traceback (``--debug`` shows it);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "BinaxError",
    "ConfigError",
    "DataError",
    "MissingDataError",
    "CheckpointError",
    "WorkdirBusyError",
    "NonFiniteError",
    "DiskFullError",
    "WorkdirError",
    "MissingDependencyError",
    "PackedFileError",
]


class BinaxError(Exception):
    """An error in the user's request (config, names, data, workdir); its message says what to change."""


class ConfigError(BinaxError, ValueError):
    """A config value, name or shape that binax does not accept; the message lists what it does."""


class DataError(BinaxError, ValueError):
    """A dataset file that exists but cannot be read (truncated, damaged, not the expected format)."""


class MissingDataError(BinaxError, FileNotFoundError):
    """A dataset that is not on this machine; the message gives the command that installs it."""


class CheckpointError(BinaxError, RuntimeError):
    """No checkpoint of a workdir can be used (damaged, or saved by a different model)."""


class WorkdirBusyError(BinaxError, RuntimeError):
    """Another process is training in the same workdir."""


class NonFiniteError(BinaxError, FloatingPointError):
    """The loss, a gradient or a parameter became NaN or infinite; the message names the
    step and the last checkpoint to go back to."""


class DiskFullError(BinaxError, OSError):
    """The disk filled up while a run wrote its workdir; the message says what was kept."""


class WorkdirError(BinaxError, OSError):
    """The workdir or a file in it cannot be used (permissions, a read-only disk, a file
    in the way of a directory, a damaged config.json...); the message names the path."""


class MissingDependencyError(BinaxError, ImportError):
    """An optional package a feature needs is not installed; the message gives the pip command."""


class PackedFileError(BinaxError, ValueError):
    """A packed model file that cannot be loaded (not a zip, truncated, damaged, another
    format version, or arrays that do not fit its model); the message names the file."""
