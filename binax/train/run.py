"""A training run's parts, built once before its first update: the data, the trainer,
the jitted steps, the checkpoints restored or a fresh state, the record writers
(:func:`open_run`). The loop (:mod:`binax.train.loop`) reads them and changes none but
:class:`Status`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax.data
from binax.train import checkpoints as ckpt_lib
from binax.train import probes, records, steps, workdir_config
from binax.train import metrics as metrics_lib
from binax.train.trainer import Trainer, build_trainer, make_mesh, start_from

__all__ = ["Hook", "Compiled", "Outputs", "Status", "Run", "open_run", "close"]

#: ``hook(step, state, metrics)``: called before the first update (``metrics=None``) and
#: after every update (see :mod:`binax.train.loop`).
Hook = Callable[[int, steps.TrainState, "Mapping[str, jax.Array] | None"], None]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """The jitted functions: the update, the schedules (for the records, which would
    otherwise compile op by op), with the shardings of the state and of the batches."""

    update: Callable  # (state, global batch) -> (state, metrics)
    learning_rates: Callable  # step -> {name: rate}
    replicated: NamedSharding
    data: NamedSharding


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where the run writes: checkpoints, metric records, progress, probes (built at
    first use, on a fixed batch of 256 test examples)."""

    ckpts: ckpt_lib.Checkpoints
    writer: metrics_lib.MetricsWriter
    reporter: metrics_lib.ProgressReporter
    run_probes: Callable[[], probes.RunProbes]


@dataclasses.dataclass
class Status:
    """What the error path reads after a failure: the step reached, and whether
    ``final.json`` was written."""

    step: int
    final_written: bool = False


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run's parts, built once by :func:`open_run`; the loop's functions read
    them and change none but :class:`Status`."""

    config: ml_collections.ConfigDict
    workdir: str
    ds: Any
    trainer: Trainer
    compiled: Compiled
    out: Outputs
    hooks: tuple[Hook, ...]
    resume_step: int | None
    wall_start: float
    status: Status

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0


def compile_steps(trainer: Trainer) -> Compiled:
    """The jitted update (out: replicated; its input state donated) and schedules. Three
    compilations in all: the init, one train step, one eval step (``binax.train.evaluate``)."""
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    schedules = trainer.schedules
    return Compiled(
        update=jax.jit(trainer.train_fn, out_shardings=replicated, donate_argnums=0),
        learning_rates=jax.jit(lambda step: {name: fn(step) for name, fn in schedules.items()}),
        replicated=replicated,
        data=NamedSharding(mesh, P("data")),
    )


def restore_or_init(ckpts, trainer: Trainer, compiled: Compiled, init_variables):
    """``(state, resume_step, pending window)``: the newest intact checkpoint, or a fresh
    state (from ``init_variables`` when given)."""
    abstract = ckpt_lib.abstract_like(jax.eval_shape(trainer.init), compiled.replicated)
    restored = ckpts.restore_latest_intact(abstract)
    if restored is not None:
        return restored.state, restored.step, restored.loop_state.get("window", [])
    state = jax.jit(trainer.init, out_shardings=compiled.replicated)()
    if init_variables is not None:
        state = start_from(state, init_variables, trainer.tx, compiled.replicated)
    return state, None, []


def record_start(config, workdir: str, plan, resume_step: int | None) -> None:
    """Logs the config and any change to it, and records the plan in the workdir."""
    logging.info("config:\n%s", config)
    if plan.neutral or plan.changes:
        logging.warning(
            "resuming %s with a changed config%s: %s",
            workdir,
            f" (recorded in {workdir_config.HISTORY_NAME})" if plan.changes else "",
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in {**plan.changes, **plan.neutral}.items()),
        )
    workdir_config.record(plan, workdir, resume_step=resume_step)


def open_run(config, workdir: str, plan, init_variables, hooks: Sequence[Hook]):
    """``(run, state, window)``: the run's parts, and where its training starts."""
    wall_start = time.time()
    is_main = jax.process_index() == 0
    ds = binax.data.create(
        config.data, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )
    trainer = build_trainer(config, ds)
    compiled = compile_steps(trainer)
    ckpts = ckpt_lib.Checkpoints(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.get("async_save", True),
    )
    state, resume_step, pending = restore_or_init(ckpts, trainer, compiled, init_variables)
    step = int(state.step)
    if is_main:
        record_start(config, workdir, plan, resume_step)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=resume_step, enabled=is_main)
    if resume_step is None:
        writer.write_config(json.loads(config.to_json_best_effort()))
    total_steps = trainer.steps_per_epoch * config.num_epochs
    reporter = metrics_lib.ProgressReporter(
        total_steps, step, enabled=is_main, every_seconds=config.get("report_every_seconds", 30.0)
    )
    run_probes = functools.cache(lambda: probes.RunProbes(trainer.model, ds.eval_batches(256)))
    logging.info(
        "training %s on %s: %d images, %d steps/epoch x %d epochs = %d steps, batch %d over %d "
        "devices in %d process(es); workdir %s%s",
        config.model.name,
        config.data.name,
        ds.num_train,
        trainer.steps_per_epoch,
        config.num_epochs,
        total_steps,
        config.batch_size,
        jax.device_count(),
        jax.process_count(),
        workdir,
        "" if resume_step is None else f"; resuming from step {resume_step}",
    )
    run = Run(
        config, workdir, ds, trainer, compiled, Outputs(ckpts, writer, reporter, run_probes),
        tuple(hooks), resume_step, wall_start, Status(step),
    )
    return run, state, records.MetricWindow(step - len(pending) + 1, pending)


def close(run: Run) -> None:
    run.out.reporter.close()
    run.out.writer.close()
    run.out.ckpts.close()
