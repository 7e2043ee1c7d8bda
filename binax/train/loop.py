"""The training loop: ``train_and_evaluate(config, workdir)``.

Data parallel in the global view: one ``jax.jit`` of the pure ``train_step`` whose batch is
sharded over a ``('data',)`` mesh of every device of every process and whose state is
replicated. The loop on the host only feeds batches, writes records and checkpoints.

Resuming is exact. The state (step, params, batch statistics, optimizer state, base key)
is checkpointed whole, every ``checkpoint.every_steps`` updates and at every epoch end;
update ``s`` draws ``fold_in(key, s)`` and reads progress from ``s``, and the data restarts
at ``(epoch, step_in_epoch)``; so a run killed at any point and restarted in the same
workdir repeats the uninterrupted run's updates bit for bit. Metric records are written at
every checkpoint as well as every ``log_every_steps``, so their windows line up too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from binax.train import checkpoints as ckpt_lib
from binax.train import metrics as metrics_lib
from binax.train import optimizers, steps

__all__ = [
    "NonFiniteLossError",
    "train_and_evaluate",
    "make_mesh",
    "maybe_initialize_distributed",
    "create_model",
    "Trainer",
    "build_trainer",
]

PROGRESS_UNITS = ("epoch", "step")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and checkpoint."""


def maybe_initialize_distributed(dist: ml_collections.ConfigDict | None) -> bool:
    """Calls ``jax.distributed.initialize`` when the config or environment asks for it.

    Multi-process when ``dist.num_processes > 1`` (with ``coordinator_address`` and
    ``process_id``), when ``JAX_COORDINATOR_ADDRESS`` is set, or with ``dist.auto`` (JAX then
    detects SLURM, Open MPI, Kubernetes, Cloud TPU...). Must run before anything touches a
    JAX device. Returns whether this process is part of a multi-process run.
    """
    if jax.distributed.is_initialized():
        return True
    dist = dist or ml_collections.ConfigDict()
    num_processes = dist.get("num_processes", 1) or 1
    wanted = num_processes > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or dist.get("auto", False)
    if not wanted:
        return False
    kwargs = {}
    if num_processes > 1:
        if not dist.get("coordinator_address"):
            raise ValueError(
                f"distributed.num_processes={num_processes} needs distributed.coordinator_address "
                "('host:port' of process 0)"
            )
        kwargs = dict(
            coordinator_address=dist.coordinator_address,
            num_processes=num_processes,
            process_id=dist.get("process_id", 0),
        )
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D ``('data',)`` mesh over every device of every process.

    The axis is ``Auto``: sharding is left to XLA's propagation from the input shardings,
    which is all data parallelism needs (``Explicit`` axes would make every op's sharding
    part of its type).
    """
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def create_model(model_config: ml_collections.ConfigDict):
    """``binax.models.create(name, **overrides)`` from ``config.model = {name, **overrides}``."""
    import binax.models

    spec = model_config.to_dict()
    name = spec.pop("name")
    return binax.models.create(name, **spec)


def _validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    if config.progress_unit not in PROGRESS_UNITS:
        raise ValueError(f"progress_unit={config.progress_unit!r} is not one of {PROGRESS_UNITS}")
    if config.compute_dtype not in steps.COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={config.compute_dtype!r} is not one of {tuple(steps.COMPUTE_DTYPES)}")
    if not (isinstance(config.num_epochs, int) and config.num_epochs >= 1):
        raise ValueError(f"num_epochs={config.num_epochs!r} must be an int >= 1")
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value < 1 or value % num_devices:
            raise ValueError(
                f"{key}={value} must be a positive multiple of the {num_devices} devices "
                "(each device gets an equal share of the batch)"
            )
    if config.log_every_steps < 1:
        raise ValueError(f"log_every_steps={config.log_every_steps} must be >= 1")
    if config.checkpoint.every_steps < 0:
        raise ValueError(f"checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0 (0: epoch ends only)")
    if config.eval_every_epochs < 0:
        raise ValueError(f"eval_every_epochs={config.eval_every_epochs} must be >= 0 (0: at the end only)")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _record_config(config: ml_collections.ConfigDict, workdir: str, resuming: bool) -> None:
    """Writes ``workdir/config.json``; a resumed run warns about keys that changed."""
    path = os.path.join(workdir, "config.json")
    new = json.loads(config.to_json_best_effort())
    if resuming and os.path.exists(path):
        with open(path) as f:
            old = _flatten(json.load(f))
        flat = _flatten(new)
        changed = sorted(k for k in set(old) | set(flat) if old.get(k) != flat.get(k))
        if changed:
            logging.warning(
                "resuming %s with a changed config: %s",
                workdir,
                ", ".join(f"{k}: {old.get(k)!r} -> {flat.get(k)!r}" for k in changed),
            )
    with open(path, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)


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


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, np.float64)))


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a config turns into before any device work: the model, the optimizer and the
    pure functions the loop jits (also used by ``benchmarks/train_step.py``).

    Attributes:
      init: ``() -> TrainState`` from ``config.seed``.
      train_fn: ``(state, batch) -> (state, metrics)``; the update's key
        ``fold_in(state.rng, state.step)`` and its progress both come from ``state.step``.
      eval_fn: ``(state, batch, totals) -> totals`` (see ``steps.eval_step``).
      schedules: name -> optax schedule, for logging.
    """

    model: Any
    tx: Any
    schedules: dict
    steps_per_epoch: int
    progress_fn: Callable
    init: Callable
    train_fn: Callable
    eval_fn: Callable


def build_trainer(config: ml_collections.ConfigDict, ds) -> Trainer:
    """The model, optimizer and pure step functions of ``config`` on dataset ``ds``.

    Raises ``ValueError`` when the model's classes do not match the dataset's.
    """
    model = create_model(config.model)
    steps_per_epoch = ds.steps_per_epoch(config.batch_size)
    if config.get("max_steps_per_epoch"):
        # Epochs cut short (quick runs): each still starts a fresh (seed, epoch) order.
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    num_epochs = config.num_epochs
    tx, schedules = optimizers.create_optimizer(
        config.optimizer,
        config.get("binary_optimizer"),
        steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs,
        grad_clip_norm=config.get("grad_clip_norm", 0.0),
    )
    compute_dtype = steps.COMPUTE_DTYPES[config.compute_dtype]
    # The model's config says how its latent weights are clipped (BNN: 1.0); the training
    # config may override it.
    clip = config.get("latent_weight_clip")
    clip = getattr(model, "latent_weight_clip", None) if clip is None else clip
    progress_fn = functools.partial(
        steps.progress_at, steps_per_epoch=steps_per_epoch, num_epochs=num_epochs, unit=config.progress_unit
    )
    image_shape = tuple(ds.image_shape)

    def init():
        return steps.create_train_state(model, tx, image_shape, jax.random.PRNGKey(config.seed))

    def train_fn(state, batch):
        # Key and progress come from the step counter: nothing but the state carries over.
        return steps.train_step(
            state,
            batch,
            progress_fn(state.step),
            jax.random.fold_in(state.rng, state.step),
            model=model,
            tx=tx,
            latent_weight_clip=clip or None,
            compute_dtype=compute_dtype,
            label_smoothing=config.get("label_smoothing", 0.0),
        )

    def eval_fn(state, batch, totals):
        return steps.eval_step(state, batch, progress_fn(state.step), totals, model=model, compute_dtype=compute_dtype)

    abstract_state = jax.eval_shape(init)
    logits = jax.eval_shape(
        lambda s: model.apply(
            {"params": s.params, "batch_stats": s.batch_stats}, jnp.zeros((1, *image_shape)), train=False
        ),
        abstract_state,
    )
    if logits.shape[-1] != ds.num_classes:
        raise ValueError(
            f"model {config.model.name!r} outputs {logits.shape[-1]} classes but dataset "
            f"{config.data.name!r} has {ds.num_classes}; set config.model.num_classes"
        )
    return Trainer(model, tx, schedules, steps_per_epoch, progress_fn, init, train_fn, eval_fn)


def _start_from(state: steps.TrainState, variables: Mapping[str, Any], tx, sharding) -> steps.TrainState:
    """``state`` with the given params/batch_stats and a fresh optimizer state for them."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    want = jax.tree.map(lambda a: (a.shape, a.dtype), (state.params, state.batch_stats))
    got = jax.tree.map(lambda a: (tuple(a.shape), jnp.asarray(a).dtype), (params, batch_stats))
    if want != got:
        raise ValueError(
            "init_variables do not match the model's variables (structure, shapes, dtypes): "
            f"model {want}, given {got}"
        )
    params, batch_stats = jax.device_put((params, batch_stats), sharding)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=jax.jit(tx.init, out_shardings=sharding)(params))


def restore_variables(
    workdir: str, step: str | int = "best"
) -> tuple[Any, dict[str, Any], ml_collections.ConfigDict, int]:
    """The model, ``{params, batch_stats}``, config and step of a trained run in ``workdir``.

    Reads ``workdir/config.json`` (written by :func:`train_and_evaluate`) and the
    checkpoint ``step``: ``'best'`` (highest eval accuracy; the latest if none was
    evaluated), ``'latest'`` or a step number. The saved ``TrainState`` is read as a plain
    tree, so nothing about the optimizer is needed to restore the model's variables.
    """
    path = os.path.join(os.path.abspath(workdir), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: is {workdir!r} the --workdir of a binax training run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckpts = ckpt_lib.Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), async_save=False)
    saved = ckpts.all_steps()
    if not saved:
        raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    if step == "best":
        chosen = ckpts.best_step()
        chosen = ckpts.latest_step() if chosen is None else chosen
    elif step == "latest":
        chosen = ckpts.latest_step()
    else:
        try:
            chosen = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"step must be 'best', 'latest' or an integer; got {step!r}.") from None
        if chosen not in saved:
            raise ValueError(f"no checkpoint at step {chosen}; saved steps: {sorted(saved)}.")
    state = ckpts.restore_tree(chosen)
    ckpts.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return create_model(config.model), jax.tree.map(jnp.asarray, variables), config, chosen


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[int], None] | None = None,
    init_variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming what is there) and evaluates it.

    Writes ``workdir/{checkpoints/, metrics.jsonl, tb/, config.json, final.json}``.
    ``on_step(step)`` is called on the host after every update (after any checkpoint of
    that step), e.g. to stop a run from a test. ``init_variables`` ({params, batch_stats})
    starts a fresh run from given weights instead of the model's initializers (fine-tuning,
    e.g. BinaryDuo's decoupled network); a run resumed from its own checkpoint ignores it.
    Returns the final summary (what
    ``final.json`` holds). Raises ``NonFiniteLossError`` when the loss stops being finite
    and ``KeyboardInterrupt`` after saving a checkpoint on SIGINT/SIGTERM.
    """
    wall_start = time.time()
    maybe_initialize_distributed(config.get("distributed"))
    import binax.data

    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    num_devices = jax.device_count()
    _validate(config, num_devices)

    ds = binax.data.create(
        config.data, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )
    trainer = build_trainer(config, ds)
    schedules, progress_fn = trainer.schedules, trainer.progress_fn
    steps_per_epoch, num_epochs = trainer.steps_per_epoch, config.num_epochs
    total_steps = steps_per_epoch * num_epochs

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    abstract_state = jax.eval_shape(trainer.init)

    os.makedirs(workdir, exist_ok=True)
    ckpts = ckpt_lib.Checkpoints(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.get("async_save", True),
    )
    resume_step = ckpts.latest_step()
    if resume_step is None:
        state = jax.jit(trainer.init, out_shardings=replicated)()
        if init_variables is not None:
            state = _start_from(state, init_variables, trainer.tx, replicated)
    else:
        state = ckpts.restore(resume_step, ckpt_lib.abstract_like(abstract_state, replicated))
    step = int(state.step)
    if is_main:
        _record_config(config, workdir, resuming=resume_step is not None)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=resume_step, enabled=is_main)

    def learning_rates(step):
        return {name: schedule(step) for name, schedule in schedules.items()}

    # Three compilations in all: the init above, one train step, one eval step (+ the
    # schedules for logging, which would otherwise compile op by op).
    p_train = jax.jit(trainer.train_fn, out_shardings=replicated, donate_argnums=0)
    p_eval = jax.jit(trainer.eval_fn, out_shardings=replicated)
    p_learning_rates = jax.jit(learning_rates)

    def to_global(local_batch):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(data_sharding, np.asarray(x)), local_batch
        )

    def evaluate(state) -> dict[str, float]:
        totals = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(replicated, x), steps.zero_eval_totals()
        )
        for local in ds.eval_batches(config.eval_batch_size):
            totals = p_eval(state, to_global(local), totals)
        totals = jax.device_get(totals)
        count = float(totals["count"])
        return {"test/loss": float(totals["loss_sum"]) / count, "test/accuracy": float(totals["correct"]) / count}

    logging.info(
        "training %s on %s: %d images, %d steps/epoch x %d epochs = %d steps, batch %d over %d "
        "devices in %d process(es); workdir %s%s",
        config.model.name,
        config.data.name,
        ds.num_train,
        steps_per_epoch,
        num_epochs,
        total_steps,
        config.batch_size,
        num_devices,
        jax.process_count(),
        workdir,
        "" if resume_step is None else f"; resuming from step {resume_step}",
    )

    reporter = metrics_lib.ProgressReporter(
        total_steps, step, enabled=is_main, every_seconds=config.get("report_every_seconds", 30.0)
    )
    window: list[dict[str, jax.Array]] = []
    window_start = (step, time.monotonic())
    last_signs = steps.latent_kernel_signs(state.params)
    last_eval: dict[str, float] | None = None
    train_seconds = 0.0

    def write_train_record(state) -> dict[str, float]:
        """Averages the metrics since the last record, checks the loss, writes one record."""
        nonlocal window, window_start, last_signs
        fetched = jax.device_get(window)
        first_step = step - len(fetched)
        for i, m in enumerate(fetched):
            if not math.isfinite(float(m["loss"])):
                ckpts.wait()
                last = ckpts.latest_step()
                where = f"step {last} in {ckpts.directory}" if last is not None else "none saved yet"
                raise NonFiniteLossError(
                    f"training loss is {float(m['loss'])} at step {first_step + i + 1} (update "
                    f"{first_step + i}); the last checkpoint to go back to is {where}. Change the "
                    "config (e.g. a lower learning rate) and rerun with the same --workdir to resume there."
                )
        now = time.monotonic()
        record = {f"train/{k}": _mean([m[k] for m in fetched]) for k in ("loss", "accuracy", "grad_norm", "update_norm")}
        record["train/param_norm"] = float(fetched[-1]["param_norm"])
        record.update({k: float(v) for k, v in jax.device_get(p_learning_rates(step - 1)).items()})
        record["progress"] = progress_fn(step - 1)
        record["epoch"] = step / steps_per_epoch
        signs = steps.latent_kernel_signs(state.params)
        if signs:
            record["flip_ratio"] = steps.flip_ratio(last_signs, signs)
        last_signs = signs
        elapsed = now - window_start[1]
        if elapsed > 0:
            record["perf/steps_per_sec"] = (step - window_start[0]) / elapsed
            record["perf/examples_per_sec"] = record["perf/steps_per_sec"] * config.batch_size
        writer.write(step, record)
        window, window_start = [], (step, now)
        return record

    record: dict[str, float] = {}
    with _StopRequest() as stop:
        try:
            start_epoch = step // steps_per_epoch
            for epoch in range(start_epoch, num_epochs):
                epoch_t0 = time.monotonic()
                skip = step - epoch * steps_per_epoch
                batches = ds.train_batches(epoch, config.batch_size, start_step=skip)
                for local in itertools.islice(batches, steps_per_epoch - skip):
                    state, m = p_train(state, to_global(local))
                    step += 1
                    window.append(m)
                    epoch_end = step % steps_per_epoch == 0
                    ckpt_due = epoch_end or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0)
                    if step % config.log_every_steps == 0 or ckpt_due or stop.signum is not None:
                        record = write_train_record(state)
                    if stop.signum is not None:
                        ckpts.save(step, state)
                        ckpts.wait()
                        logging.warning(
                            "signal %d: saved step %d in %s; rerun the same command to resume",
                            stop.signum,
                            step,
                            ckpts.directory,
                        )
                        raise KeyboardInterrupt
                    if ckpt_due and not epoch_end:
                        ckpts.save(step, state)
                    reporter.update(step, {"loss": record["train/loss"]} if record else None)
                    if on_step is not None:
                        on_step(step)
                if step != (epoch + 1) * steps_per_epoch:
                    raise RuntimeError(
                        f"the dataset yielded {step - epoch * steps_per_epoch - skip} batches in epoch "
                        f"{epoch} from step {skip}; expected {steps_per_epoch - skip}"
                    )
                train_seconds += time.monotonic() - epoch_t0
                eval_due = epoch + 1 == num_epochs or (
                    config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0
                )
                accuracy = None
                if eval_due:
                    last_eval = evaluate(state)
                    accuracy = last_eval["test/accuracy"]
                    writer.write(step, last_eval)
                    reporter.message(
                        f"epoch {epoch + 1}/{num_epochs}: test accuracy {100 * accuracy:.2f}%, "
                        f"loss {last_eval['test/loss']:.4f}"
                    )
                ckpts.save(step, state, accuracy=accuracy)
                reporter.update(step, force=True)
        finally:
            reporter.close()
            writer.close()
            ckpts.wait()

    if last_eval is None:  # the workdir already held a finished run
        last_eval = evaluate(state)
    best_step = ckpts.best_step()
    ckpts.close()
    wall = time.time() - wall_start
    summary = {
        "test_accuracy": last_eval["test/accuracy"],
        "test_loss": last_eval["test/loss"],
        "step": step,
        "epochs": num_epochs,
        "best_step": best_step,
        "resumed_from_step": resume_step,
        "wall_time_s": wall,
        "train_time_s": train_seconds,
        "devices": num_devices,
        "processes": jax.process_count(),
        "model": config.model.name,
        "dataset": config.data.name,
    }
    if is_main:
        with open(os.path.join(workdir, "final.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"final: test accuracy {100 * summary['test_accuracy']:.2f}% (loss {summary['test_loss']:.4f}) "
            f"after {num_epochs} epochs / {step} steps; wall time {metrics_lib.format_duration(wall)} "
            f"({wall:.0f} s{'' if resume_step is None else f', this run, resumed from step {resume_step}'}); "
            f"workdir {workdir}",
            flush=True,
        )
    return summary
