"""Metric records (JSONL + TensorBoard) and progress reporting for the training loop.

``workdir/metrics.jsonl`` holds one JSON object per record, ``{"step": s, name: value,
...}``; ``workdir/tb`` the same scalars as TensorBoard events (tensorboardX, which needs no
TensorFlow), plus histograms (latent weights, pre-activations: ``binax.train.probes``). Keys under ``perf/`` are wall-clock measurements; every other key is a
deterministic function of the configuration, so a resumed run writes the same records as
an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import logging as std_logging
import math
import os
import sys
import threading
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
from flax import traverse_util

from binax import files

__all__ = ["MetricsWriter", "ProgressReporter", "read_metrics", "format_duration", "quiet_checkpoint_logs"]


# What tensorstore and the OS say when a disk is full; the loop reports that in one line.
_DISK_FULL_TEXT = ("RESOURCE_EXHAUSTED", "No space left on device")


def _mentions_disk_full(record) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += " " + str(record.exc_info[1])
    return any(t in text for t in _DISK_FULL_TEXT)


class _QuietCheckpointRecords:
    """A logging filter for records from files under ``fragment`` (orbax): drops those
    below WARNING, and the error traces of a write that failed on a full disk."""

    def __init__(self, fragment: str):
        self.fragment = fragment

    def filter(self, record) -> bool:
        if self.fragment not in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not _mentions_disk_full(record)


class _QuietDiskFull:
    """A logging filter that drops records about a full disk (asyncio's "exception was
    never retrieved" for orbax's failed write tasks)."""

    def filter(self, record) -> bool:
        return not _mentions_disk_full(record)


def _quiet_unraisable(unraisable) -> None:
    # A failed tensorstore write leaves callbacks that find their event loop closed; the
    # failure itself reaches the loop as an exception.
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        logging.debug("after a failed checkpoint write: %r", unraisable.exc_value)
        return
    sys.__unraisablehook__(unraisable)


def quiet_checkpoint_logs() -> None:
    """Hides orbax's INFO lines (several per save) from absl logging, and jax's INFO lines
    about backends absent from this machine (``Unable to initialize backend 'tpu'``);
    warnings still show.

    Also keeps a failed asynchronous checkpoint write on a full disk from printing
    screens of tracebacks from orbax's threads: the loop stops with one line that says
    what happened and what was kept (:class:`~binax.errors.DiskFullError`).
    For command-line runs, whose log the user reads; a library call changes no logging.
    """
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _QuietCheckpointRecords) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietCheckpointRecords(f"{os.sep}orbax{os.sep}"))
    # jax probes every backend it knows at first use and logs each that is absent
    # ("Unable to initialize backend 'tpu': ... libtpu.so") at INFO: noise on every run
    # without that hardware. Only those lines go; a backend that is present still runs,
    # and jax's warnings (a GPU without a CUDA jaxlib) still show.
    probe_logger = std_logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _QuietBackendProbe) for f in probe_logger.filters):
        probe_logger.addFilter(_QuietBackendProbe())
    asyncio_logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietDiskFull) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_QuietDiskFull())
    sys.unraisablehook = _quiet_unraisable
    threading.excepthook = _quiet_thread_errors


class _QuietBackendProbe(std_logging.Filter):
    """Drops jax's INFO lines about backends it could not initialize (absent hardware)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not (record.levelno < std_logging.WARNING and str(record.msg).startswith("Unable to initialize backend"))


def _quiet_thread_errors(args) -> None:
    # tensorboardX's writer thread dies on a full disk; the loop reports the disk.
    if isinstance(args.exc_value, OSError) and args.exc_value.errno == errno.ENOSPC:
        logging.debug("a writer thread stopped: %r", args.exc_value)
        return
    threading.__excepthook__(args)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file.

    A line that is not a record (a JSON object with an integer ``step``) is skipped with a
    warning naming the file and line; a torn last line (a writer killed mid-line) is
    skipped silently, since every resume leaves one.
    """
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines) or line.endswith("\n"):
                logging.warning("%s line %d is not JSON; skipped: %.80r", path, number, line)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            logging.warning("%s line %d is not a metric record (an object with an integer 'step'); skipped: %.80r",
                            path, number, line.strip())
            continue
        records.append(record)
    return records


class MetricsWriter:
    """Writes scalar records to ``workdir/metrics.jsonl`` and ``workdir/tb``.

    ``resume_step``: the step a resumed run restarts from. Records after it (written by the
    interrupted run after its last checkpoint) are dropped from the JSONL file and purged
    from TensorBoard, so the files read as one uninterrupted run. ``enabled=False`` (every
    process but the first) writes nothing.
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        files.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", buffering=1)
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

        purge = resume_step + 1 if resume_step else None
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge, flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Appends ``{"step": step, **scalars}`` (one line, flushed) and the TensorBoard scalars."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(name, float(value), int(step))

    def write_config(self, config: Mapping[str, Any], metrics: tuple[str, ...] = ("test/accuracy", "train/loss")) -> None:
        """The run's config for TensorBoard: as text (the whole tree, JSON) and as hparams.

        Hyper-parameters are the config's leaves under flattened names
        (``optimizer.learning_rate``); TensorBoard's HParams tab then compares runs by them
        against ``metrics``. Written into this run's own event file (tensorboardX's
        ``add_hparams`` would start a separate run for them).
        """
        if not self.enabled:
            return
        from tensorboardX.summary import hparams

        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self._tb.add_text("config", "```\n" + text + "\n```", 0)
        flat = {k: _hparam_value(v) for k, v in flatten(config).items()}
        writer = self._tb._get_file_writer()
        for summary in hparams(flat, {m: 0.0 for m in metrics}):
            writer.add_summary(summary)

    def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
        """One TensorBoard histogram per array (e.g. the latent weights of every binary layer)."""
        if not self.enabled:
            return
        for name, values in arrays.items():
            self._tb.add_histogram(name, np.asarray(values, np.float32).ravel(), int(step))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if not (self.enabled and self._file is not None):
            return
        try:
            self._file.close()
        finally:
            self._file = None
            try:
                self._tb.close()
            except OSError:
                _abandon_tensorboard(self._tb)
                raise


def _abandon_tensorboard(tb) -> None:
    """After tensorboardX failed to flush (a full disk): stops its writer threads and marks
    its event writers closed, so that nothing retries the write and prints a traceback at
    exit (tensorboardX's own ``close`` stops half-way when the flush fails)."""
    writers = list((getattr(tb, "all_writers", None) or {}).values()) or [getattr(tb, "file_writer", None)]
    for writer in writers:
        event_writer = getattr(writer, "event_writer", None)
        if event_writer is None or not hasattr(event_writer, "_closed"):
            continue
        worker = getattr(event_writer, "_worker", None)
        if worker is not None and worker.is_alive():
            worker.stop()  # its shutdown signal ends the thread without another write
        event_writer._closed = True


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``{'optimizer.learning_rate': 0.1, ...}``: a nested dict's leaves under dotted names
    (an empty dict has none)."""
    return traverse_util.flatten_dict(dict(tree), sep=".")


def _hparam_value(value):
    """TensorBoard hparams take bool, number or string; anything else is shown as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``) for a number of seconds."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressReporter:
    """A progress bar with ETA on a terminal, periodic log lines otherwise.

    On a TTY (``sys.stderr.isatty()``) this is a tqdm bar over the training steps; in a
    log file or CI it logs ``step s/T (p%), r steps/s, ETA ...`` at most every
    ``every_seconds``. The rate counts only steps run by this process (a resumed run's
    ETA is not skewed by the steps it skipped).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, *, enabled: bool = True, every_seconds: float = 30.0):
        self.total = total_steps
        self.enabled = enabled
        self.every_seconds = every_seconds
        self._start_step = initial_step
        self._step = initial_step
        self._start = time.monotonic()
        self._last_report = -math.inf
        self._bar = None
        self._first = True
        self._postfix: dict[str, float] = {}
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def steps_per_second(self) -> float:
        elapsed = time.monotonic() - self._start
        return (self._step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def set_postfix(self, postfix: Mapping[str, float]) -> None:
        """What every following report shows after the rate, e.g. the latest loss."""
        self._postfix = dict(postfix)
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(f"{k} {v:.4g}" for k, v in self._postfix.items()), refresh=False)

    def update(self, step: int, postfix: Mapping[str, float] | None = None, *, force: bool = False) -> None:
        """Reports that ``step`` updates are done; ``postfix`` replaces the shown values."""
        if not self.enabled:
            return
        if postfix is not None:
            self.set_postfix(postfix)
        done, self._step = step - self._step, step
        if self._first:
            # Measure the rate from the first reported step on: it excludes compilation.
            self._first = False
            self._start, self._start_step = time.monotonic(), step
        text = ", ".join(f"{k} {v:.4g}" for k, v in self._postfix.items())
        if self._bar is not None:
            self._bar.update(done)
            return
        now = time.monotonic()
        if not force and now - self._last_report < self.every_seconds:
            return
        self._last_report = now
        rate = self.steps_per_second()
        eta = (self.total - step) / rate if rate > 0 else math.inf
        logging.info(
            "step %d/%d (%.0f%%), %.2f steps/s, ETA %s%s",
            step,
            self.total,
            100.0 * step / max(self.total, 1),
            rate,
            format_duration(eta),
            f", {text}" if text else "",
        )

    def message(self, text: str) -> None:
        """A line for the user: above the bar on a terminal, a log line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            logging.info("%s", text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
