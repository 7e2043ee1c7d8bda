"""The training loop: ``train_and_evaluate(config, workdir)``.

Data parallel in the global view: one ``jax.jit`` of the pure ``train_step`` whose batch is
sharded over a ``('data',)`` mesh of every device of every process and whose state is
replicated. The loop on the host only feeds batches, writes records and checkpoints.

A run, step by step (the methods of ``_Run``, called in this order):

1. lock the workdir: one run per workdir (``binax.train.workdir``);
2. build the data, model, optimizer and jitted steps (:func:`build_trainer`);
3. resume from the newest *intact* checkpoint (damaged ones are reported and moved
   aside), or initialize;
4. per epoch: one update per batch, a metric record every ``log_every_steps`` updates and
   at the epoch end, a checkpoint every ``checkpoint.every_steps`` updates; evaluate;
   checkpoint the epoch end;
5. write ``final.json`` (before the last checkpoint, so a full disk loses no result).

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

import dataclasses
import errno
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

from binax import files, layers, quantizer
from binax.errors import BinaxError, CheckpointError, ConfigError, DiskFullError, NonFiniteError
from binax.train import checkpoints as ckpt_lib
from binax.train import config_check
from binax.train import evaluation
from binax.train import metrics as metrics_lib
from binax.train import optimizers, steps
from binax.train import workdir_config
from binax.train.workdir import check_not_busy, environment_errors, lock_workdir, usable_workdir

__all__ = [
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

PROGRESS_UNITS = config_check.PROGRESS_UNITS

# Kept for code written against binax 0.1: the error now covers gradients and parameters too.
NonFiniteLossError = NonFiniteError

# Per-update metrics that must stay finite; a record or checkpoint stops the run otherwise.
FINITE_METRICS = ("loss", "grad_norm", "update_norm", "param_norm")


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
            raise ConfigError(
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


def _top5_text(accuracy: float | None) -> str:
    return "" if accuracy is None else f" (top-5 {100 * accuracy:.2f}%)"


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
      schedules: name -> optax schedule, for logging.
    """

    model: Any
    tx: Any
    schedules: dict
    steps_per_epoch: int
    progress_fn: Callable
    init: Callable
    train_fn: Callable


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

    abstract_state = jax.eval_shape(init)
    logits = jax.eval_shape(
        lambda s: model.apply(
            {"params": s.params, "batch_stats": s.batch_stats}, jnp.zeros((1, *image_shape)), train=False
        ),
        abstract_state,
    )
    if logits.shape[-1] != ds.num_classes:
        raise ConfigError(
            f"model {config.model.name!r} outputs {logits.shape[-1]} classes but dataset "
            f"{config.data.name!r} has {ds.num_classes}; set config.model.num_classes"
        )
    return Trainer(model, tx, schedules, steps_per_epoch, progress_fn, init, train_fn)


def _start_from(state: steps.TrainState, variables: Mapping[str, Any], tx, sharding) -> steps.TrainState:
    """``state`` with the given params/batch_stats and a fresh optimizer state for them."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    want = jax.tree.map(lambda a: (a.shape, a.dtype), (state.params, state.batch_stats))
    got = jax.tree.map(lambda a: (tuple(a.shape), jnp.asarray(a).dtype), (params, batch_stats))
    if want != got:
        raise ConfigError(
            "init_variables do not match the model's variables (structure, shapes, dtypes): "
            f"model {want}, given {got}"
        )
    params, batch_stats = jax.device_put((params, batch_stats), sharding)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=jax.jit(tx.init, out_shardings=sharding)(params))


def restore_variables(
    workdir: str, step: str | int = "best"
) -> tuple[Any, dict[str, Any], ml_collections.ConfigDict, int]:
    """The model, ``{params, batch_stats}``, config and step of a trained run in ``workdir``.

    Reads ``workdir/config.json`` (written by :func:`train_and_evaluate`, with the changes
    of ``config_history.jsonl`` applied) and the
    checkpoint ``step``: ``'best'`` (highest eval accuracy; the latest if none was
    evaluated), ``'latest'`` or a step number. The saved ``TrainState`` is read as a plain
    tree onto this process's first device (whatever devices trained it), so nothing about
    the optimizer or the training mesh is needed; the variables are verified against
    their checksums. Raises :class:`~binax.errors.CheckpointError` for a damaged
    checkpoint, naming the intact steps to pass instead.

    Example::

        model, variables, config, step = binax.train.restore_variables("runs/default")
        logits = model.apply(variables, images, train=False)
    """
    saved = workdir_config.current_config(os.path.abspath(workdir))
    if saved is None:
        path = os.path.join(os.path.abspath(workdir), workdir_config.CONFIG_NAME)
        raise FileNotFoundError(f"no {path}: is {workdir!r} the --workdir of a binax training run?")
    config = ml_collections.ConfigDict(saved)
    # The file is data: a quantizer it names must already be registered here.
    quantizer.check_file_config(config.model, os.path.join(os.path.abspath(workdir), workdir_config.CONFIG_NAME))
    ckpts = ckpt_lib.Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), async_save=False)
    try:
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
                raise ConfigError(f"step must be 'best', 'latest' or an integer; got {step!r}.") from None
            if chosen not in saved:
                raise ConfigError(f"no checkpoint at step {chosen}; saved steps: {saved}.")
        try:
            state = ckpts.restore_tree(chosen)
        except ckpt_lib.DamagedCheckpoint as e:
            others = [s for s in saved if s != chosen]
            raise CheckpointError(f"{e}. Other saved steps: {others or 'none'}.") from None
    finally:
        ckpts.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return create_model(config.model), jax.tree.map(jnp.asarray, variables), config, chosen


def _is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it came from reports a full disk (ENOSPC, or
    tensorstore's text for it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _quietly(fn: Callable[[], Any]) -> None:
    """Runs a clean-up while another error propagates: its own failure (often the same
    full disk) is logged, not chained onto the error the user must read."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        logging.debug("clean-up failed too: %r", e)


class _Window:
    """The per-update metrics since the last record: device scalars, fetched on demand.

    Saved with every checkpoint (as host floats), so a resumed run continues the window
    that was open and its next record averages the same updates as an uninterrupted run.
    """

    def __init__(self, first_step: int, pending=()):
        self.first_step = first_step  # the step the window's first update produced
        self.items: list[Mapping[str, Any]] = list(pending)

    def append(self, metrics: Mapping[str, Any]) -> None:
        self.items.append(metrics)

    def __len__(self) -> int:
        return len(self.items)

    def host(self) -> list[dict[str, float]]:
        """The metrics as host floats (fetched once, in one transfer)."""
        fetched = jax.device_get(self.items)
        self.items = [{k: float(v) for k, v in m.items()} for m in fetched]
        return self.items

    def check_finite(self, where: Callable[[], str]) -> None:
        """Raises :class:`NonFiniteError` at the first update with a non-finite loss,
        gradient, update or parameter norm; ``where()`` names the checkpoint to go back to
        (called only then: it waits for a pending save)."""
        for i, m in enumerate(self.host()):
            bad = {k: m[k] for k in FINITE_METRICS if k in m and not math.isfinite(m[k])}
            if bad:
                step = self.first_step + i
                what = ", ".join(f"{k} is {v}" for k, v in bad.items())
                if "loss" not in bad:
                    what = f"loss is {m['loss']:.4g} but {what}"
                raise NonFiniteError(
                    f"training {what} at step {step} (update {step - 1}); the last checkpoint to go "
                    f"back to is {where()}. Change the config (e.g. a lower learning rate) and rerun with "
                    "the same --workdir to resume there."
                )

    def record(self) -> dict[str, float]:
        """Means over the window (the parameter norm: its last value)."""
        items = self.host()
        out = {}
        for key in items[0]:
            values = [m[key] for m in items]
            if key == "param_norm":
                out["train/param_norm"] = values[-1]
            elif key.startswith("flip_ratio"):
                out[key] = _mean(values)
            else:
                out[f"train/{key}"] = _mean(values)
        return out

    def restart(self, first_step: int) -> None:
        self.first_step, self.items = first_step, []


class _Run:
    """One training run's parts and progress; ``train_and_evaluate`` calls its steps."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, init_variables, on_step, plan):
        self.config, self.workdir, self.on_step, self.plan = config, workdir, on_step, plan
        self.wall_start = time.time()
        self.is_main = jax.process_index() == 0
        self.final_written = False
        self.last_eval: dict[str, float] | None = None
        self.train_seconds = 0.0
        self._build()
        self._restore_or_init(init_variables)

    # ------------------------------------------------------------------ 2. build

    def _build(self) -> None:
        import binax.data

        config = self.config
        self.ds = binax.data.create(
            config.data, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count()
        )
        self.trainer = build_trainer(config, self.ds)
        self.steps_per_epoch = self.trainer.steps_per_epoch
        self.total_steps = self.steps_per_epoch * config.num_epochs
        mesh = make_mesh()
        self.replicated = NamedSharding(mesh, P())
        self.data_sharding = NamedSharding(mesh, P("data"))
        schedules = self.trainer.schedules
        # Three compilations in all: the init, one train step, one eval step (in
        # binax.train.evaluate; + the schedules for logging, which would otherwise compile
        # op by op).
        self.p_train = jax.jit(self.trainer.train_fn, out_shardings=self.replicated, donate_argnums=0)
        self.p_learning_rates = jax.jit(lambda step: {name: fn(step) for name, fn in schedules.items()})

    # ------------------------------------------------------------------ 3. resume or init

    def _restore_or_init(self, init_variables) -> None:
        config = self.config
        self.ckpts = ckpt_lib.Checkpoints(
            os.path.join(self.workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.get("async_save", True),
        )
        abstract = ckpt_lib.abstract_like(jax.eval_shape(self.trainer.init), self.replicated)
        restored = self.ckpts.restore_latest_intact(abstract)
        if restored is None:
            self.resume_step = None
            self.state = jax.jit(self.trainer.init, out_shardings=self.replicated)()
            if init_variables is not None:
                self.state = _start_from(self.state, init_variables, self.trainer.tx, self.replicated)
            pending = []
        else:
            self.resume_step, self.state = restored.step, restored.state
            pending = restored.loop_state.get("window", [])
        self.step = int(self.state.step)
        self.window = _Window(self.step - len(pending) + 1, pending)
        if self.is_main:
            logging.info("config:\n%s", config)
            plan = self.plan
            if plan.neutral or plan.changes:
                logging.warning(
                    "resuming %s with a changed config%s: %s",
                    self.workdir,
                    f" (recorded in {workdir_config.HISTORY_NAME})" if plan.changes else "",
                    ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in {**plan.changes, **plan.neutral}.items()),
                )
            workdir_config.record(plan, self.workdir, resume_step=self.resume_step)
        self.writer = metrics_lib.MetricsWriter(self.workdir, resume_step=self.resume_step, enabled=self.is_main)
        if self.resume_step is None:
            self.writer.write_config(json.loads(config.to_json_best_effort()))
        self.reporter = metrics_lib.ProgressReporter(
            self.total_steps, self.step, enabled=self.is_main, every_seconds=config.get("report_every_seconds", 30.0)
        )
        logging.info(
            "training %s on %s: %d images, %d steps/epoch x %d epochs = %d steps, batch %d over %d "
            "devices in %d process(es); workdir %s%s",
            config.model.name,
            config.data.name,
            self.ds.num_train,
            self.steps_per_epoch,
            config.num_epochs,
            self.total_steps,
            config.batch_size,
            jax.device_count(),
            jax.process_count(),
            self.workdir,
            "" if self.resume_step is None else f"; resuming from step {self.resume_step}",
        )

    # ------------------------------------------------------------------ 4. train

    def _to_global(self, local_batch):
        """The global batch array of this process's share (``batch_size / process_count`` rows).

        A dataset that draws its batches on the devices (``'synthetic'``) yields global
        ``jax.Array`` batches already; they pass through unchanged.
        """
        return jax.tree.map(
            lambda x: x
            if isinstance(x, jax.Array)
            else jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x)),
            local_batch,
        )

    def _last_checkpoint(self) -> str:
        self.ckpts.wait()
        last = self.ckpts.latest_step()
        return f"step {last} in {self.ckpts.directory}" if last is not None else "none saved yet"

    def _write_train_record(self) -> None:
        """Checks and averages the window into one record at the current step."""
        if not len(self.window):
            return
        self._check_finite()
        record = self.window.record()
        step = self.step
        record.update({k: float(v) for k, v in jax.device_get(self.p_learning_rates(step - 1)).items()})
        record["progress"] = self.trainer.progress_fn(step - 1)
        record["epoch"] = step / self.steps_per_epoch
        if self.is_main:  # EDE's t and k, tanh's nu, ...: TensorBoard scalars like the losses
            record.update(self._probes().scalars(record["progress"]))
        now = time.monotonic()
        elapsed = now - self._window_clock[1]
        if elapsed > 0 and step > self._window_clock[0]:
            record["perf/steps_per_sec"] = (step - self._window_clock[0]) / elapsed
            record["perf/examples_per_sec"] = record["perf/steps_per_sec"] * self.config.batch_size
        self.writer.write(step, record)
        self.reporter.set_postfix({"loss": record["train/loss"]})
        self.window.restart(step + 1)
        self._window_clock = (step, now)

    def _check_finite(self) -> None:
        self.window.check_finite(self._last_checkpoint)

    def _save(self, accuracy: float | None = None) -> None:
        """Checkpoints the current step with the open metric window (checked finite first)."""
        self._check_finite()
        # A copy: orbax writes the metadata after an asynchronous save, while the window grows.
        window = [dict(m) for m in self.window.host()]
        self.ckpts.save(self.step, self.state, accuracy=accuracy, loop_state={"window": window})

    def _evaluate(self) -> dict[str, float]:
        """Test (and validation) loss and accuracy of the current state: ``binax.train.evaluate`` on the
        sharded global batches, at the progress the next update would read."""
        variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
        return evaluation.evaluate_splits(
            self.trainer.model,
            variables,
            self.ds,
            self.config.eval_batch_size,
            progress=self.trainer.progress_fn(self.step),
            compute_dtype=self.config.compute_dtype,
            put=self._to_global,
        )

    def _train_epoch(self, epoch: int, stop: "_StopRequest") -> None:
        config = self.config
        t0 = time.monotonic()
        skip = self.step - epoch * self.steps_per_epoch
        batches = self.ds.train_batches(epoch, config.batch_size, start_step=skip)
        every = config.checkpoint.every_steps
        for local in itertools.islice(batches, self.steps_per_epoch - skip):
            self.state, metrics = self.p_train(self.state, self._to_global(local))
            self.step += 1
            self.window.append(metrics)
            epoch_end = self.step % self.steps_per_epoch == 0
            if not epoch_end:  # the epoch end writes its record and checkpoint itself
                if self.step % config.log_every_steps == 0:
                    self._write_train_record()
                if every and self.step % every == 0:
                    self._save()
            self.reporter.update(self.step)
            if self.on_step is not None:
                self.on_step(self.step)
            if stop.signum is not None and not epoch_end:
                self._stop(stop.signum)
        done = self.step - epoch * self.steps_per_epoch
        if done != self.steps_per_epoch:
            raise RuntimeError(
                f"the dataset yielded {done - skip} batches in epoch {epoch} from step {skip}; "
                f"expected {self.steps_per_epoch - skip}"
            )
        self.train_seconds += time.monotonic() - t0

    def _probes(self):
        """Schedule scalars and pre-activation histograms (built at first use, on a fixed
        batch of 256 test examples): a :class:`binax.train.probes.RunProbes`."""
        from binax.train import probes

        if getattr(self, "_run_probes", None) is None:
            self._run_probes = probes.RunProbes(self.trainer.model, self.ds.eval_batches(256))
        return self._run_probes

    def _latent_weights(self) -> dict[str, np.ndarray]:
        """``{'latent_weights/<layer>': latent kernel}`` on the host, for histograms."""
        out = {}
        for path, w in jax.tree_util.tree_leaves_with_path(self.state.params):
            if layers.is_latent_kernel_path(path):
                out["latent_weights/" + ckpt_lib.path_name(path[:-1])] = ckpt_lib.host_copy(w)
        return out

    def _stop(self, signum: int) -> None:
        """Saves the current step (with the open metric window) and stops the run."""
        self._save()
        self.ckpts.wait()
        logging.warning(
            "signal %d: saved step %d in %s; rerun the same command to resume", signum, self.step, self.ckpts.directory
        )
        raise StopRequested(signum)

    def _end_epoch(self, epoch: int) -> None:
        """The epoch's record, its evaluation if due, ``final.json`` after the last, a checkpoint."""
        config = self.config
        self._write_train_record()
        last = epoch + 1 == config.num_epochs
        accuracy = None
        if last or (config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0):
            self.last_eval = self._evaluate()
            accuracy = evaluation.selection_accuracy(self.last_eval)
            self.writer.write(self.step, self.last_eval)
            self.reporter.message(
                f"epoch {epoch + 1}/{config.num_epochs}: test accuracy {100 * self.last_eval['test/accuracy']:.2f}%"
                f"{_top5_text(self.last_eval.get('test/top5_accuracy'))}{evaluation.validation_text(self.last_eval)}, "
                f"loss {self.last_eval['test/loss']:.4f}"
            )
        if self.is_main:
            variables = {"params": self.state.params, "batch_stats": self.state.batch_stats}
            pre = self._probes().histograms(variables, self.trainer.progress_fn(self.step))
            self.writer.write_histograms(self.step, {**self._latent_weights(), **pre})
        if last:
            # The result first: a full disk at the last checkpoint must not lose it.
            self._write_final(final_checkpoint=None)
        self._save(accuracy)
        self.reporter.update(self.step, force=True)

    def train(self, stop: "_StopRequest") -> None:
        self._window_clock = (self.step, time.monotonic())
        for epoch in range(self.step // self.steps_per_epoch, self.config.num_epochs):
            self._train_epoch(epoch, stop)
            self._end_epoch(epoch)
            if stop.signum is not None and epoch + 1 < self.config.num_epochs:
                self.ckpts.wait()
                logging.warning("signal %d: stopped after epoch %d; rerun the same command to resume", stop.signum, epoch + 1)
                raise StopRequested(stop.signum)

    # ------------------------------------------------------------------ 5. finish

    def summary(self, final_checkpoint: int | None) -> dict[str, Any]:
        if self.last_eval is None:  # the workdir already held a finished run
            self.last_eval = self._evaluate()
        wall = time.time() - self.wall_start
        return {
            "test_accuracy": self.last_eval["test/accuracy"],
            "test_loss": self.last_eval["test/loss"],
            **evaluation.validation_summary(self.last_eval),
            **({"test_top5_accuracy": self.last_eval["test/top5_accuracy"]}
               if "test/top5_accuracy" in self.last_eval else {}),
            "step": self.step,
            "epochs": self.config.num_epochs,
            "best_step": self.ckpts.best_step() if final_checkpoint is not None else None,
            "final_checkpoint": final_checkpoint,
            "resumed_from_step": self.resume_step,
            "wall_time_s": wall,
            "train_time_s": self.train_seconds,
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "model": self.config.model.name,
            "dataset": self.config.data.name,
        }

    def _write_final(self, final_checkpoint: int | None) -> dict[str, Any]:
        summary = self.summary(final_checkpoint)
        if self.is_main:
            files.write_json(os.path.join(self.workdir, workdir_config.FINAL_NAME), summary)
            self.final_written = True
        return summary

    def finish(self) -> dict[str, Any]:
        """Waits for the last checkpoint, then writes and prints the final summary."""
        self.ckpts.wait()
        summary = self._write_final(final_checkpoint=self.ckpts.latest_step())
        if self.is_main:
            wall = summary["wall_time_s"]
            print(
                f"final: test accuracy {100 * summary['test_accuracy']:.2f}%"
                f"{_top5_text(summary.get('test_top5_accuracy'))}{evaluation.validation_text(self.last_eval)} (loss {summary['test_loss']:.4f}) "
                f"after {summary['epochs']} epochs / {self.step} steps; wall time "
                f"{metrics_lib.format_duration(wall)} ({wall:.0f} s"
                f"{'' if self.resume_step is None else f', this run, resumed from step {self.resume_step}'}); "
                f"workdir {self.workdir}",
                flush=True,
            )
        return summary

    def close(self) -> None:
        self.reporter.close()
        self.writer.close()
        self.ckpts.close()

    def disk_full_error(self, e: BaseException) -> DiskFullError:
        kept = (
            f"the final metrics are in {os.path.join(self.workdir, 'final.json')}; "
            if self.final_written
            else ""
        )
        try:
            last = self.ckpts.latest_step()
        except Exception:  # noqa: BLE001
            last = None
        error = DiskFullError(
            f"no space left on device while writing {self.workdir} at step {self.step}: {kept}"
            f"the newest checkpoint is {'step ' + str(last) if last is not None else 'none'}. "
            "Free some space and rerun the same command to resume."
        )
        error.errno = errno.ENOSPC
        return error


def _report_finished(workdir: str, final: Mapping[str, Any]) -> None:
    if jax.process_index() == 0:
        accuracy = final.get("test_accuracy")
        print(
            f"workdir {workdir} holds a finished run (test accuracy "
            f"{'?' if accuracy is None else f'{100 * accuracy:.2f}%'} after {final.get('step')} steps, "
            f"{os.path.join(workdir, workdir_config.FINAL_NAME)}): nothing to train, nothing written. "
            "Use a new --workdir to train again.",
            flush=True,
        )


def _final_checkpoint_intact(workdir: str, final: Mapping[str, Any]) -> bool:
    """Whether a finished run's final checkpoint reads back as written. When it does not,
    the run is resumed as usual: from the newest intact checkpoint, damage reported."""
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        ckpts.restore_tree(int(final["final_checkpoint"]))
        return True
    except ckpt_lib.DamagedCheckpoint as e:
        logging.warning("%s; the finished run is resumed from its newest intact checkpoint", e)
        return False
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        logging.warning("the final checkpoint named by %s cannot be read (%r); resuming", workdir, e)
        return False
    finally:
        ckpts.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_step: Callable[[int], None] | None = None,
    init_variables: Mapping[str, Any] | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming what is there) and evaluates it.

    Writes ``workdir/{checkpoints/, metrics.jsonl, tb/, config.json, final.json}``.
    ``on_step(step)`` is called on the host after every update (after any checkpoint of
    that step), e.g. to stop a run from a test. ``init_variables`` ({params, batch_stats})
    starts a fresh run from given weights instead of the model's initializers (fine-tuning,
    e.g. BinaryDuo's decoupled network); a run resumed from its own checkpoint ignores it.
    Returns the final summary (what ``final.json`` holds).

    The config is validated before anything is written (:mod:`binax.train.config_check`).
    A workdir holds one config (:mod:`binax.train.workdir_config`): a rerun with another
    config stops unless ``allow_config_change``, and a finished run is reported and
    returned as it is, without training or writing.

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
        if plan.finished is not None and _final_checkpoint_intact(workdir, plan.finished):
            _report_finished(workdir, plan.finished)
            return plan.finished
        with lock_workdir(workdir, enabled=jax.process_index() == 0):
            return _train_locked(config, workdir, plan, init_variables, on_step)


def _train_locked(config, workdir: str, plan, init_variables, on_step) -> dict[str, Any]:
    run = None
    try:
        run = _Run(config, workdir, init_variables, on_step, plan)
        with _StopRequest() as stop:
            run.train(stop)
        summary = run.finish()
        run.close()
    except BaseException as e:
        if run is not None:
            _quietly(run.close)
        # A full disk once the run exists says what it kept; before, the caller's
        # environment_error names the file.
        if run is not None and isinstance(e, Exception) and _is_disk_full(e) and not isinstance(e, BinaxError):
            raise run.disk_full_error(e) from e
        raise
    return summary
