"""Metric records (JSONL + TensorBoard) and progress reporting for the training loop.

``workdir/metrics.jsonl`` holds one JSON object per record, ``{"step": s, name: value,
...}``; ``workdir/tb`` the same scalars as TensorBoard events (tensorboardX, which needs no
TensorFlow). Keys under ``perf/`` are wall-clock measurements; every other key is a
deterministic function of the configuration, so a resumed run writes the same records as
an uninterrupted one.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import time
from typing import Mapping

from absl import logging

__all__ = ["MetricsWriter", "ProgressReporter", "read_metrics", "format_duration", "quiet_checkpoint_logs"]


class _DropInfoFrom:
    """A logging filter that drops records below WARNING from files under ``fragment``."""

    def __init__(self, fragment: str):
        self.fragment = fragment

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or self.fragment not in record.pathname


def quiet_checkpoint_logs() -> None:
    """Hides orbax's INFO lines (several per save) from absl logging; warnings still show.

    For command-line runs, whose log the user reads; a library call changes no logging.
    """
    absl_logger = logging.get_absl_logger()
    if not any(isinstance(f, _DropInfoFrom) for f in absl_logger.filters):
        absl_logger.addFilter(_DropInfoFrom(f"{os.sep}orbax{os.sep}"))


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a killed writer) is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
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
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(self.path + ".tmp", self.path)
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

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled and self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = None


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
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def steps_per_second(self) -> float:
        elapsed = time.monotonic() - self._start
        return (self._step - self._start_step) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, postfix: Mapping[str, float] | None = None, *, force: bool = False) -> None:
        """Reports that ``step`` updates are done; ``postfix`` adds e.g. the latest loss."""
        if not self.enabled:
            return
        done, self._step = step - self._step, step
        if self._first:
            # Measure the rate from the first reported step on: it excludes compilation.
            self._first = False
            self._start, self._start_step = time.monotonic(), step
        text = ", ".join(f"{k} {v:.4g}" for k, v in (postfix or {}).items())
        if self._bar is not None:
            self._bar.update(done)
            if postfix:
                self._bar.set_postfix_str(text, refresh=False)
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
