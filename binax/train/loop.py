"""The training loop: ``train_and_evaluate(config, workdir, hooks=...)``.

Data parallel in the global view: one ``jax.jit`` of the pure ``train_step`` whose batch is
sharded over a ``('data',)`` mesh of every device of every process and whose state is
replicated. The loop on the host only feeds batches, writes records and checkpoints.

A run, step by step (each a function of this module, called in this order):

1. lock the workdir: one run per workdir (``binax.train.workdir``);
2. :func:`~binax.train.run.open_run`: build the data, model, optimizer and jitted steps
   (:func:`~binax.train.trainer.build_trainer`), then resume from the newest *intact*
   checkpoint (damaged ones are reported and moved aside) or initialize;
3. :func:`_train`: per epoch, :func:`_train_epoch` (one update per batch, a record every
   ``log_every_steps`` updates, a checkpoint every ``checkpoint.every_steps``, the hooks
   after every update), then :func:`_end_epoch` (the epoch's record, its evaluation if
   due, histograms) and :func:`_save`;
4. :func:`_finish`: ``final.json`` (written before the last checkpoint too, so a full disk
   loses no result; :mod:`binax.train.finish`).

The functions share one frozen :class:`Run` (the parts, built once) and thread the train
state through their arguments and results; the one mutable thing a failure must see is
:class:`_Status` (the step reached, whether ``final.json`` was written).

A hook is ``hook(step, state, metrics)``, called on every process once before the first
update with the state training starts from (``step`` 0, or the step resumed from) and
``metrics=None``, then after every update (after any record or checkpoint of that step
but at an epoch end, whose record and checkpoint follow) with the
:class:`~binax.train.TrainState` after update ``step - 1`` and that update's metrics
(``loss``, ``grad_norm``, ... as device scalars: reading one waits for the update). The
state is donated to the next update, so a hook keeps copies
(``jax.tree.map(np.array, state.params)``), not the arrays. A hook may raise to stop the
run (a test's ``KeyboardInterrupt``).

Resuming is exact. The state (step, params, batch statistics, optimizer state, base key)
is checkpointed whole with the per-update metrics since the last record; update ``s``
draws ``fold_in(key, s)`` and reads progress from ``s``, and the data restarts at
``(epoch, step_in_epoch)``. So a run stopped at any point (SIGKILL, SIGTERM, Ctrl-C) and
restarted in the same workdir repeats the uninterrupted run's updates bit for bit on the
same machine and device count, and writes the same metric records. (Across machines or
device counts, reductions run in another order: float results agree to rounding, and a
binary network can flip a sign where a pre-activation is within rounding of zero.)

Every record and checkpoint checks that the loss, gradients and parameters are finite
(:class:`~binax.errors.NonFiniteError`), so no checkpoint holds a diverged state.
"""

from __future__ import annotations

import functools
import itertools
import os
import signal
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding

from binax.errors import BinaxError, NonFiniteError
from binax.train import config_check, evaluation, finish, records, steps, workdir_config
from binax.train.records import MetricWindow
from binax.train.restore import restore_variables
from binax.train.run import Hook, Run, close, open_run
from binax.train.trainer import (
    Trainer,
    build_trainer,
    create_model,
    make_mesh,
    maybe_initialize_distributed,
)
from binax.train.workdir import check_not_busy, environment_errors, lock_workdir, usable_workdir

__all__ = [
    "Hook",
    "NonFiniteError",
    "NonFiniteLossError",
    "StopRequested",
    "train_and_evaluate",
    "make_mesh",
    "maybe_initialize_distributed",
    "create_model",
    "Trainer",
    "build_trainer",
    "restore_variables",
]

# Kept for code written against binax 0.1: the error now covers gradients and parameters too.
NonFiniteLossError = NonFiniteError

class StopRequested(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; ``signum`` says which
    (the command line exits with ``128 + signum``: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each update.

    The loop then writes a checkpoint before it exits. A second Ctrl-C interrupts at once
    (the first restores Python's handler). Outside the main thread signals cannot be
    caught, and this does nothing.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------ 3. train


def _to_global(sharding: NamedSharding, local_batch):
    """The global batch array of this process's share (``batch_size / process_count`` rows).

    A dataset that draws its batches on the devices (``'synthetic'``) yields global
    ``jax.Array`` batches already; they pass through unchanged.
    """
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        local_batch,
    )


def _last_checkpoint(run: Run) -> str:
    run.out.ckpts.wait()
    last = run.out.ckpts.latest_step()
    return f"step {last} in {run.out.ckpts.directory}" if last is not None else "none saved yet"


def _check_finite(run: Run, window: MetricWindow) -> None:
    window.check_finite(functools.partial(_last_checkpoint, run))


def _write_train_record(run: Run, step: int, window: MetricWindow, clock: tuple[int, float]):
    """Checks and averages the window into one record at ``step``; returns the new clock
    ``(step, time)`` the next record's throughput is measured from."""
    if not len(window):
        return clock
    _check_finite(run, window)
    progress = run.trainer.progress_fn(step - 1)
    # EDE's t and k, tanh's nu, ...: TensorBoard scalars like the losses.
    scalars = run.out.run_probes().scalars(progress) if run.is_main else {}
    now = time.monotonic()
    record = records.train_record(
        window, step, learning_rates=run.compiled.learning_rates(step - 1), progress=progress,
        steps_per_epoch=run.trainer.steps_per_epoch, batch_size=run.config.batch_size,
        scalars=scalars, clock=clock, now=now,
    )
    run.out.writer.write(step, record)
    run.out.reporter.set_postfix({"loss": record["train/loss"]})
    window.restart(step + 1)
    return (step, now)


def _save(run: Run, state: steps.TrainState, window: MetricWindow, accuracy: float | None = None) -> None:
    """Checkpoints ``state`` with the open metric window (checked finite first)."""
    _check_finite(run, window)
    # A copy: orbax writes the metadata after an asynchronous save, while the window grows.
    pending = [dict(m) for m in window.host()]
    run.out.ckpts.save(int(run.status.step), state, accuracy=accuracy, loop_state={"window": pending})


def _stop(run: Run, state, window, signum: int) -> None:
    """Saves the current step (with the open metric window) and stops the run."""
    _save(run, state, window)
    run.out.ckpts.wait()
    logging.warning(
        "signal %d: saved step %d in %s; rerun the same command to resume", signum, run.status.step, run.out.ckpts.directory
    )
    raise StopRequested(signum)


def _train_epoch(run: Run, state, window, epoch: int, stop: _StopRequest, clock):
    """The updates of ``epoch`` from the current step; returns ``(state, clock)``."""
    config, per_epoch = run.config, run.trainer.steps_per_epoch
    skip = run.status.step - epoch * per_epoch
    batches = run.ds.train_batches(epoch, config.batch_size, start_step=skip)
    every = config.checkpoint.every_steps
    for local in itertools.islice(batches, per_epoch - skip):
        state, metrics = run.compiled.update(state, _to_global(run.compiled.data, local))
        run.status.step += 1
        step = run.status.step
        window.append(metrics)
        epoch_end = step % per_epoch == 0
        if not epoch_end:  # the epoch end writes its record and checkpoint itself
            if step % config.log_every_steps == 0:
                clock = _write_train_record(run, step, window, clock)
            if every and step % every == 0:
                _save(run, state, window)
        run.out.reporter.update(step)
        for hook in run.hooks:
            hook(step, state, metrics)
        if stop.signum is not None and not epoch_end:
            _stop(run, state, window, stop.signum)
    done = run.status.step - epoch * per_epoch
    if done != per_epoch:
        raise RuntimeError(
            f"the dataset yielded {done - skip} batches in epoch {epoch} from step {skip}; expected {per_epoch - skip}"
        )
    return state, clock


def _evaluate(run: Run, state) -> dict[str, float]:
    """Test (and validation) loss and accuracy of ``state``: ``binax.train.evaluate`` on the
    sharded global batches, at the progress the next update would read."""
    return evaluation.evaluate_splits(
        run.trainer.model,
        {"params": state.params, "batch_stats": state.batch_stats},
        run.ds,
        run.config.eval_batch_size,
        progress=run.trainer.progress_fn(run.status.step),
        compute_dtype=run.config.compute_dtype,
        put=functools.partial(_to_global, run.compiled.data),
    )


def _end_epoch(run: Run, state, window, epoch: int, clock):
    """The epoch's record, its evaluation if due (written and reported), the histograms;
    returns ``(evaluation or None, clock)``."""
    config, step = run.config, run.status.step
    clock = _write_train_record(run, step, window, clock)
    last = epoch + 1 == config.num_epochs
    result = None
    if last or (config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0):
        result = _evaluate(run, state)
        run.out.writer.write(step, result)
        run.out.reporter.message(
            f"epoch {epoch + 1}/{config.num_epochs}: test accuracy {100 * result['test/accuracy']:.2f}%"
            f"{records.top5_text(result.get('test/top5_accuracy'))}{evaluation.validation_text(result.get('validation/accuracy'))}, "
            f"loss {result['test/loss']:.4f}"
        )
    if run.is_main:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        pre = run.out.run_probes().histograms(variables, run.trainer.progress_fn(step))
        run.out.writer.write_histograms(step, {**records.latent_weights(state.params), **pre})
    return result, clock


def _train(run: Run, state, window, stop: _StopRequest):
    """Every epoch left; returns ``(state, last evaluation or None, seconds in updates)``."""
    config = run.config
    clock = (run.status.step, time.monotonic())
    last_eval, train_seconds = None, 0.0
    for hook in run.hooks:
        hook(run.status.step, state, None)
    for epoch in range(run.status.step // run.trainer.steps_per_epoch, config.num_epochs):
        t0 = time.monotonic()
        state, clock = _train_epoch(run, state, window, epoch, stop, clock)
        train_seconds += time.monotonic() - t0
        result, clock = _end_epoch(run, state, window, epoch, clock)
        last_eval = result or last_eval
        if epoch + 1 == config.num_epochs:
            # The result first: a full disk at the last checkpoint must not lose it.
            _write_final(run, _summary(run, state, last_eval, train_seconds, final_checkpoint=None))
        _save(run, state, window, None if result is None else evaluation.selection_accuracy(result))
        run.out.reporter.update(run.status.step, force=True)
        if stop.signum is not None and epoch + 1 < config.num_epochs:
            run.out.ckpts.wait()
            logging.warning("signal %d: stopped after epoch %d; rerun the same command to resume", stop.signum, epoch + 1)
            raise StopRequested(stop.signum)
    return state, last_eval, train_seconds


# ------------------------------------------------------------------ 4. finish


def _summary(run: Run, state, last_eval, train_seconds: float, final_checkpoint: int | None) -> dict[str, Any]:
    """``final.json``'s contents (evaluating ``state`` when no evaluation ran: a workdir
    whose finished run lost its final checkpoint)."""
    return finish.summary(
        run.config,
        _evaluate(run, state) if last_eval is None else last_eval,
        step=run.status.step,
        best_step=run.out.ckpts.best_step() if final_checkpoint is not None else None,
        final_checkpoint=final_checkpoint,
        resume_step=run.resume_step,
        wall_time_s=time.time() - run.wall_start,
        train_time_s=train_seconds,
    )


def _write_final(run: Run, summary: Mapping[str, Any]) -> None:
    if run.is_main:
        finish.write_final(run.workdir, summary)
        run.status.final_written = True


def _finish(run: Run, state, last_eval, train_seconds: float) -> dict[str, Any]:
    """Waits for the last checkpoint, then writes and prints the final summary."""
    run.out.ckpts.wait()
    summary = _summary(run, state, last_eval, train_seconds, final_checkpoint=run.out.ckpts.latest_step())
    _write_final(run, summary)
    if run.is_main:
        finish.print_final(run.workdir, summary)
    return summary


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    hooks: Sequence[Hook] = (),
    init_variables: Mapping[str, Any] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming what is there) and evaluates it.

    Writes ``workdir/{checkpoints/, metrics.jsonl, tb/, config.json, final.json}``.
    ``hooks``: each called as ``hook(step, state, metrics)`` on the host before the first
    update (``metrics=None``) and after every update (see the module docstring: the state
    is donated to the next update, copy what you keep), e.g. to snapshot weights, record
    every loss, measure a probe or stop a run from a test.
    ``init_variables`` ({params, batch_stats}) starts a fresh run from given weights
    instead of the model's initializers (fine-tuning, e.g. BinaryDuo's decoupled network);
    a run resumed from its own checkpoint ignores it. Returns the final summary (what
    ``final.json`` holds).

    The config is validated before anything is written (:mod:`binax.train.config_check`).
    A workdir holds one config (:mod:`binax.train.workdir_config`): a rerun with another
    config stops unless ``allow_config_change``, and a finished run is reported and
    returned as it is, without training or writing (no hook is called).

    Raises :class:`~binax.errors.ConfigError` for an invalid config or one that differs
    from the workdir's, :class:`~binax.errors.NonFiniteError` when the loss, a gradient or
    a parameter stops being finite, :class:`~binax.errors.WorkdirBusyError` when another
    process trains in ``workdir``, :class:`~binax.errors.WorkdirError` when the workdir
    cannot be used (permissions, a read-only disk, a file in the way, a damaged
    config.json), :class:`~binax.errors.CheckpointError` when no checkpoint in it is
    intact, :class:`~binax.errors.DiskFullError` when the disk is or fills up, and
    :class:`StopRequested` (a ``KeyboardInterrupt``) after saving a checkpoint on
    SIGINT/SIGTERM.
    """
    maybe_initialize_distributed(config.get("distributed"))
    config_check.validate(config, jax.device_count())
    workdir = os.path.abspath(workdir)
    with environment_errors(workdir):
        usable_workdir(workdir)
        if jax.process_index() == 0:
            check_not_busy(workdir)
        plan = workdir_config.check(config, workdir, allow_config_change=allow_config_change)
        if plan.finished is not None and finish.final_checkpoint_intact(workdir, plan.finished):
            finish.report_finished(workdir, plan.finished)
            return plan.finished
        with lock_workdir(workdir, enabled=jax.process_index() == 0):
            return _train_locked(config, workdir, plan, init_variables, hooks)


def _train_locked(config, workdir: str, plan, init_variables, hooks: Sequence[Hook]) -> dict[str, Any]:
    run = None
    try:
        run, state, window = open_run(config, workdir, plan, init_variables, hooks)
        with _StopRequest() as stop:
            state, last_eval, train_seconds = _train(run, state, window, stop)
        summary = _finish(run, state, last_eval, train_seconds)
        close(run)
    except BaseException as e:
        if run is not None:
            finish.quietly(functools.partial(close, run))
        # A full disk once the run exists says what it kept; before, the caller's
        # environment_error names the file.
        if run is not None and isinstance(e, Exception) and finish.is_disk_full(e) and not isinstance(e, BinaxError):
            status = run.status
            raise finish.disk_full_error(workdir, status.step, status.final_written, run.out.ckpts) from e
        raise
    return summary
