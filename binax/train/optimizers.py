"""Optimizers and learning-rate schedules built from a config, and Larq's Bop.

One optimizer spec (``default_config()``) names the update rule (``sgd``, ``nesterov``,
``adam``, ``adamw``, ``bop``), its hyper-parameters and the schedule of its step size.
``create_optimizer(spec, binary_spec, ...)`` returns one optax transformation for the whole
parameter tree; when ``binary_spec.name`` is set, the latent binary kernels (leaves named
``latent_kernel``) get their own optimizer through ``optax.multi_transform`` and every
other leaf keeps ``spec``'s.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from binax import layers
from binax.errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "BINARY_LABEL",
    "OTHER_LABEL",
    "BopState",
    "bop",
    "default_config",
    "make_schedule",
    "make_transform",
    "param_labels",
    "create_optimizer",
]

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw", "bop")
SCHEDULES = ("constant", "cosine", "linear", "step")
BINARY_LABEL = "binary"
OTHER_LABEL = "other"

ScalarOrSchedule = float | Callable[[Any], Any]


def default_config() -> ml_collections.ConfigDict:
    """Every key an optimizer spec may hold, with its default.

    ``learning_rate`` is the peak step size; ``gamma``/``threshold`` are Bop's (Bop has no
    learning rate: its schedule scales ``gamma``). ``weight_decay`` is decoupled for
    ``adamw`` and an L2 term added to the gradient (as PyTorch's SGD/Adam) otherwise.
    Schedules run over the whole training: ``warmup_epochs`` of linear warm-up from 0,
    then ``cosine`` or ``linear`` decay to ``end_factor * peak``, or ``step``: multiply by
    ``step_factor`` at each epoch in ``step_epochs``.
    """
    return ml_collections.ConfigDict(
        dict(
            name="adam",
            learning_rate=1e-3,
            schedule="cosine",
            warmup_epochs=0.0,
            end_factor=0.0,
            step_epochs=(),
            step_factor=0.1,
            momentum=0.9,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            threshold=1e-8,
            gamma=1e-4,
        )
    )


# ----------------------------------------------------------------------------- Bop


class BopState(NamedTuple):
    """Bop's state: the update count (for a ``gamma`` schedule) and the gradient EMA ``m``."""

    count: jax.Array
    momentum: optax.Updates


def bop(threshold: ScalarOrSchedule = 1e-8, gamma: ScalarOrSchedule = 1e-4) -> optax.GradientTransformation:
    """Bop, the latent-free optimizer for binary weights (Helwegen et al., NeurIPS 2019; Larq).

    With ``g`` the gradient and ``w`` the binary weight (``sign(0) = +1``)::

        m <- (1 - gamma) * m + gamma * g
        w <- -sign(w)  if |m| > threshold and sign(m) == sign(w)  else  sign(w)

    i.e. a weight flips when the smoothed gradient has pushed consistently, and hard
    enough, against its current sign. As in Larq the new weights are +-1: the first
    update also projects non-binary initial values onto their signs (exactly up to one
    float rounding of ``w + (w_new - w)``; from then on exactly). The returned
    update is ``w_new - w``, so ``optax.apply_updates`` yields ``w_new``. ``threshold`` and
    ``gamma`` may be optax schedules of the update count.
    """

    def init_fn(params):
        return BopState(
            count=jnp.zeros([], jnp.int32),
            momentum=jax.tree.map(jnp.zeros_like, params),
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("bop needs the current parameters: call update(grads, state, params)")
        g_t = gamma(state.count) if callable(gamma) else gamma
        tau = threshold(state.count) if callable(threshold) else threshold
        momentum = jax.tree.map(
            lambda m, g: m + jnp.asarray(g_t, m.dtype) * (g - m), state.momentum, updates
        )

        def new_minus_old(w, m):
            s = jnp.where(w >= 0, 1, -1).astype(w.dtype)
            flip = (jnp.abs(m) > tau) & (m * s > 0)
            return jnp.where(flip, -s, s) - w

        new_updates = jax.tree.map(new_minus_old, params, momentum)
        return new_updates, BopState(count=optax.safe_increment(state.count), momentum=momentum)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- schedules


def make_schedule(
    peak: float, spec: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: float
) -> optax.Schedule:
    """The step-size schedule ``count -> value`` of ``spec`` (see ``default_config``).

    ``total = round(num_epochs * steps_per_epoch)`` updates; the decay runs over the
    ``total - warmup`` updates after warm-up, so ``cosine`` reaches ``end_factor * peak``
    exactly at the last update (SGDR without restarts, Loshchilov & Hutter 2017).
    """
    if spec.schedule not in SCHEDULES:
        raise ConfigError(f"schedule={spec.schedule!r} is not one of {SCHEDULES}")
    if steps_per_epoch <= 0 or num_epochs <= 0:
        raise ConfigError(
            f"schedules need steps_per_epoch > 0 and num_epochs > 0, got {steps_per_epoch} and {num_epochs}"
        )
    total = max(int(round(num_epochs * steps_per_epoch)), 1)
    warmup = int(round(spec.warmup_epochs * steps_per_epoch))
    if not 0 <= warmup < total:
        raise ConfigError(
            f"warmup_epochs={spec.warmup_epochs} gives {warmup} warm-up steps; it must be "
            f">= 0 and shorter than the {total} training steps"
        )
    decay = total - warmup
    end = peak * spec.end_factor
    if spec.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif spec.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=decay, alpha=spec.end_factor)
    elif spec.schedule == "linear":
        main = optax.linear_schedule(peak, end, transition_steps=decay)
    else:
        if not spec.step_epochs:
            raise ConfigError("schedule='step' needs step_epochs, the epochs at which to decay")
        boundaries = {}
        for epoch in spec.step_epochs:
            at = int(round(epoch * steps_per_epoch)) - warmup
            boundaries[at] = boundaries.get(at, 1.0) * spec.step_factor
        main = optax.piecewise_constant_schedule(peak, boundaries)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


# ----------------------------------------------------------------------------- optimizers


def make_transform(
    spec: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: float
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation of one spec and the schedule it follows (lr, or Bop's gamma)."""
    if spec.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer name={spec.name!r} is not one of {OPTIMIZERS}")
    kw = dict(steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
    if spec.name == "bop":
        gamma = make_schedule(spec.gamma, spec, **kw)
        return bop(threshold=spec.threshold, gamma=gamma), gamma
    lr = make_schedule(spec.learning_rate, spec, **kw)
    coupled_decay = (
        [optax.add_decayed_weights(spec.weight_decay)]
        if spec.weight_decay and spec.name != "adamw"
        else []
    )
    if spec.name in ("sgd", "nesterov"):
        if spec.name == "nesterov" and not spec.momentum:
            raise ConfigError("optimizer 'nesterov' needs momentum > 0")
        rule = optax.sgd(lr, momentum=spec.momentum or None, nesterov=spec.name == "nesterov")
    elif spec.name == "adam":
        rule = optax.adam(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps)
    else:
        rule = optax.adamw(lr, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=spec.weight_decay)
    return optax.chain(*coupled_decay, rule), lr


def param_labels(params) -> Any:
    """``'binary'`` for every leaf named ``latent_kernel``, ``'other'`` for the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: BINARY_LABEL if layers.is_latent_kernel_path(path) else OTHER_LABEL, params
    )


def create_optimizer(
    spec: ml_collections.ConfigDict,
    binary_spec: ml_collections.ConfigDict | None = None,
    *,
    steps_per_epoch: int,
    num_epochs: float,
    grad_clip_norm: float = 0.0,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """The training optimizer and its named schedules (for logging).

    ``binary_spec`` with a non-empty ``name`` gives the ``latent_kernel`` leaves their own
    optimizer (``optax.multi_transform``); ``spec`` then updates the other leaves.
    ``grad_clip_norm > 0`` clips the global gradient norm first. Returns
    ``(tx, {'learning_rate': ..., 'binary/learning_rate' or 'binary/gamma': ...})``.
    """
    kw = dict(steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
    if spec.name == "bop":
        raise ValueError(
            "optimizer.name='bop' would apply Bop to real-valued parameters too; set "
            "binary_optimizer.name='bop' and a real-valued optimizer (e.g. 'adam') in optimizer"
        )
    tx, lr = make_transform(spec, **kw)
    schedules = {"learning_rate": lr}
    if binary_spec is not None and binary_spec.name:
        binary_tx, binary_schedule = make_transform(binary_spec, **kw)
        key = "binary/gamma" if binary_spec.name == "bop" else "binary/learning_rate"
        schedules[key] = binary_schedule
        tx = optax.multi_transform({OTHER_LABEL: tx, BINARY_LABEL: binary_tx}, param_labels)
    if grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
    return tx, schedules
