"""What a training config turns into before the loop runs: the distributed setup, the
device mesh, the model, and the :class:`Trainer` (optimizer and the pure functions the
loop jits); :func:`start_from` puts given weights into a fresh train state."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from binax import models
from binax.errors import ConfigError
from binax.train import optimizers, steps

__all__ = ["maybe_initialize_distributed", "make_mesh", "create_model", "Trainer", "build_trainer", "start_from"]


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
    spec = model_config.to_dict()
    name = spec.pop("name")
    return models.create(name, **spec)


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


def start_from(state: steps.TrainState, variables: Mapping[str, Any], tx, sharding) -> steps.TrainState:
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
