"""Checkpoints of the whole ``TrainState`` with orbax: verified on restore, kept latest + best.

One ``orbax.checkpoint.CheckpointManager`` in ``workdir/checkpoints``: a step directory
per save, written asynchronously and renamed into place only when complete, so a run
killed mid-save leaves the previous checkpoints intact. Preserved are the last ``keep``
saves and the one with the best evaluation accuracy (saves made at an evaluation carry
``{'accuracy': ...}`` as orbax metrics).

Integrity. Every save records, in the step's orbax metadata, the shape, dtype and CRC-32
of each array as it was in memory, and the loop's own state (the metric window since the
last record), and a CRC-32 of the record itself together with the step's orbax metrics
(the accuracy that chooses the "best" step): every byte a restore or :meth:`best_step`
reads is covered. A restore checks the arrays it read against that record and that every
float is finite, so flipped or truncated bytes, a missing file or a half-deleted step
directory are caught before training on them (:class:`DamagedCheckpoint`), and a
checkpoint of a different model or optimizer is told apart from a damaged one
(:class:`~binax.errors.CheckpointError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
import zlib
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as cm

from binax.errors import CheckpointError

__all__ = ["Checkpoints", "DamagedCheckpoint", "abstract_like", "array_records", "host_copy", "path_name"]

BEST_METRIC = "accuracy"
# Version of what binax writes into a step's custom metadata.
# 2: the record and the step's metrics carry a CRC-32 ("crc32"); 1 (binax < 0.3): only the arrays.
RECORD_FORMAT = 2
DAMAGED_DIRNAME = "damaged"


class DamagedCheckpoint(Exception):
    """A checkpoint step that cannot be read back as it was written."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"checkpoint step {step} in {path} is damaged: {reason}")
        self.step, self.path, self.reason = step, path, reason


def _best_metric(metrics) -> float:
    return float(metrics.get(BEST_METRIC, -math.inf))


def path_name(path) -> str:
    """``'params/fc1/latent_kernel'`` for a pytree key path, whatever the containers were.

    The same name for a ``TrainState`` attribute and the dict key orbax restores it
    under, and for a tuple index and a list index, so records written from the live
    state can be checked against a tree restored without a target.
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def host_copy(x) -> np.ndarray:
    """A host copy of one array (the local replica of a replicated multi-process array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def record_crc32(record: dict, metrics: dict | None) -> int:
    """CRC-32 of a step's integrity record (its arrays' records and the loop state) and its
    orbax metrics, as canonical JSON: one flipped digit anywhere changes it."""
    covered = {"arrays": record.get("arrays"), "loop": record.get("loop"), "metrics": dict(metrics or {})}
    return zlib.crc32(json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())


def array_records(tree: Any) -> dict[str, dict]:
    """``{path: {shape, dtype, crc32}}`` of every array leaf of ``tree`` (host copies)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = host_copy(leaf)
        out[path_name(path)] = {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": _crc32(a)}
    return out


def _first_line(e: BaseException, limit: int = 240) -> str:
    """A one-line reason from an orbax/tensorstore exception, whose text can run to pages.

    The innermost cause says what failed (e.g. ``FAILED_PRECONDITION: Error reading
    "params.fc0.kernel/0.0" ...: ZSTD_decompressStream() failed``); the outer ones wrap it.
    """
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = text.split(" See full TensorStore details")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(e).__name__


@contextlib.contextmanager
def _quiet_unraisable() -> Iterator[None]:
    """Keeps the event-loop noise of a failed tensorstore read off stderr.

    A read of damaged files fails in orbax's asyncio threads, whose callbacks then report
    "Event loop is closed" through ``sys.unraisablehook`` (a screenful per array). The
    restore's own exception carries the reason; these go to the debug log.
    """
    old = sys.unraisablehook
    sys.unraisablehook = lambda u: logging.debug("during a checkpoint read: %r", u.exc_value)
    try:
        yield
    finally:
        gc.collect()  # the failed read's coroutines report when collected: now, not later
        sys.unraisablehook = old


def _is_float(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.floating)


def _compare_structure(step: int, saved: dict[str, dict], expected: dict[str, tuple]) -> str | None:
    """What differs between the arrays a checkpoint holds and those a config builds, or None."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(
        k for k in set(saved) & set(expected) if tuple(saved[k]["shape"]) != tuple(expected[k][0])
    )
    if not (missing or extra or reshaped):
        return None
    parts = []
    if reshaped:
        parts.append(
            "; ".join(f"{k} {tuple(saved[k]['shape'])} saved, {tuple(expected[k][0])} now" for k in reshaped[:3])
        )
    if missing:
        parts.append(f"not in the checkpoint: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"not in this config's state: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    return "; ".join(parts)


@dataclasses.dataclass
class Restored:
    """A verified checkpoint: its step, the state, and the loop state saved with it."""

    step: int
    state: Any
    loop_state: dict
    damaged: list[DamagedCheckpoint]


class Checkpoints:
    """The checkpoints of one run: ``save``, ``restore`` (verified), ``restore_latest_intact``."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: keep at least the latest checkpoint (>= 1)")
        self.directory = os.path.abspath(directory)
        self._keep, self._async = keep, async_save
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(n=self._keep),
                cm.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=policy,
            enable_async_checkpointing=self._async,
            cleanup_tmp_directories=True,
        )
        # The handler named up front: orbax can then read a step's tree metadata (shapes)
        # without having restored it first.
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The intact saved step with the highest eval accuracy (the latest of equals), or
        None when no intact step was evaluated.

        Each step's accuracy is read with its checksum: a step whose metadata is damaged
        is reported (a warning naming its step and path) and left out, so a flipped digit
        cannot make another step the best.
        """
        best = None
        for step in self.all_steps():
            try:
                metrics = self._record(step)["metrics"]
            except DamagedCheckpoint as e:
                logging.warning("%s; it is not considered for the best step", e)
                continue
            if BEST_METRIC in metrics and (best is None or _best_metric(metrics) >= best[0]):
                best = (_best_metric(metrics), step)
        return None if best is None else best[1]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, *, accuracy: float | None = None, loop_state: dict | None = None) -> bool:
        """Saves ``state`` as ``step`` with its integrity record and ``loop_state`` (JSON).

        A step already on disk is not rewritten. Returns whether a save was started.
        """
        if step in self.manager.all_steps():
            return False
        # Saves between evaluations carry empty metrics (never the best) rather than none,
        # which orbax would warn about on every save.
        metrics = {} if accuracy is None else {BEST_METRIC: float(accuracy)}
        record = {"format": RECORD_FORMAT, "arrays": array_records(state), "loop": loop_state or {}}
        record["crc32"] = record_crc32(record, metrics)
        return self.manager.save(
            step, args=ocp.args.StandardSave(state), metrics=metrics, force=True, custom_metadata=record
        )

    def _record(self, step: int) -> dict:
        """The step's integrity record, checked against its CRC-32 with the step's metrics
        (the metrics go into ``record["metrics"]``)."""
        try:
            metadata = self.manager.metadata(step)
            record = dict(metadata.custom_metadata or {})
            metrics = dict(metadata.metrics or {})
        except Exception as e:  # noqa: BLE001 - any unreadable metadata is damage
            raise DamagedCheckpoint(step, self.step_path(step), f"its metadata cannot be read ({_first_line(e)})")
        if "arrays" not in record:
            raise DamagedCheckpoint(
                step,
                self.step_path(step),
                "it has no integrity record (its _CHECKPOINT_METADATA is missing or it was written "
                "by binax < 0.2), so its contents cannot be verified",
            )
        if record.get("format", 1) >= 2 and record.get("crc32") != record_crc32(record, metrics):
            raise DamagedCheckpoint(
                step,
                self.step_path(step),
                "its metadata (the saved metric window or evaluation metrics) does not match its checksum (CRC-32)",
            )
        record["metrics"] = metrics
        return record

    def _verify(self, step: int, record: dict, tree: Any) -> None:
        """Checks restored arrays against the saved record: shape, dtype, CRC-32, finiteness."""
        saved = record["arrays"]
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = path_name(path)
            a = host_copy(leaf)
            want = saved.get(name)
            if want is None:
                raise DamagedCheckpoint(step, self.step_path(step), f"{name} is not in its integrity record")
            if list(a.shape) != list(want["shape"]) or a.dtype.name != want["dtype"]:
                raise DamagedCheckpoint(
                    step,
                    self.step_path(step),
                    f"{name} reads back as {a.dtype.name}{list(a.shape)}, saved as {want['dtype']}{want['shape']}",
                )
            if _crc32(a) != want["crc32"]:
                raise DamagedCheckpoint(step, self.step_path(step), f"{name} does not match its checksum (CRC-32)")
            if _is_float(a.dtype) and not np.all(np.isfinite(a)):
                raise DamagedCheckpoint(step, self.step_path(step), f"{name} holds non-finite values")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, loop_state)`` of ``step``, read into ``abstract_state``'s structure,
        dtypes and shardings (a pytree of ``jax.ShapeDtypeStruct``) and verified.

        Raises :class:`DamagedCheckpoint` when the step cannot be read back as written,
        and :class:`~binax.errors.CheckpointError` when it holds another model's or
        optimizer's state (a config change, not damage).
        """
        record = self._record(step)
        expected = {
            path_name(p): (tuple(x.shape), x.dtype) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)
        }
        difference = _compare_structure(step, record["arrays"], expected)
        if difference:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds a different model or optimizer state than "
                f"this config builds ({difference}). Resume with the config the run was started with "
                "(config.json in its workdir) or use a new --workdir."
            )
        with _quiet_unraisable():
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
                raise DamagedCheckpoint(step, self.step_path(step), _first_line(e)) from e
        self._verify(step, record, state)
        return state, dict(record.get("loop") or {})

    def restore_latest_intact(self, abstract_state: Any) -> Restored | None:
        """The newest step that restores and verifies, or None when there are no checkpoints.

        Damaged newer steps are reported (a warning each), then moved out of the way into
        ``<directory>/../checkpoints.damaged/`` so the run can save those steps again.
        Raises :class:`~binax.errors.CheckpointError` when every checkpoint is damaged
        (nothing is moved then).
        """
        damaged: list[DamagedCheckpoint] = []
        for step in reversed(self.all_steps()):
            try:
                state, loop_state = self.restore(step, abstract_state)
            except DamagedCheckpoint as e:
                logging.warning("%s", e)
                damaged.append(e)
                continue
            if damaged:
                self.quarantine([d.step for d in damaged])
                logging.warning(
                    "resuming from step %d, the newest intact checkpoint; the damaged step(s) %s were moved to %s",
                    step,
                    ", ".join(str(d.step) for d in damaged),
                    self.damaged_directory,
                )
            return Restored(step, state, loop_state, damaged)
        if damaged:
            reasons = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} ({reasons}). Move the checkpoints directory "
                "away to start the run from scratch, or use a new --workdir."
            )
        return None

    @property
    def damaged_directory(self) -> str:
        return self.directory + "." + DAMAGED_DIRNAME

    def quarantine(self, steps: list[int]) -> None:
        """Moves the given step directories to :attr:`damaged_directory` (only process 0
        touches the files) and reopens the manager, which caches the steps it found."""
        self.manager.close()
        if jax.process_index() == 0:
            os.makedirs(self.damaged_directory, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                src = self.step_path(step)
                if os.path.exists(src):
                    shutil.move(src, os.path.join(self.damaged_directory, f"{step}-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("binax: damaged checkpoints moved")
        self.manager = self._manager()

    def restore_tree(self, step: int) -> Any:
        """Restores ``step`` as saved, as a plain tree of arrays on this process's first
        device, whatever devices it was saved from; every array verified."""
        record = self._record(step)
        try:
            metadata = self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(step, self.step_path(step), _first_line(e)) from e
        tree = getattr(metadata, "tree", metadata)
        if tree is None:
            raise DamagedCheckpoint(step, self.step_path(step), "its array metadata is missing")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            tree,
            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
        )
        with _quiet_unraisable():
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001
                raise DamagedCheckpoint(step, self.step_path(step), _first_line(e)) from e
        self._verify(step, record, state)
        return state

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk (raises what a failed save raised)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


def abstract_like(tree: Any, sharding) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes, all with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
