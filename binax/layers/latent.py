"""Latent weights: the ``latent_kernel`` naming contract, and clipping them after an update.

Latent-weight clipping (BNN's ``weight_clip``, Larq's ``kernel_constraint``) is a
property of training, not of the forward pass: a model names its clip value
(``latent_weight_clip``) and the trainer calls :func:`clip_latent_weights` on the
parameter tree after each update; layers know nothing of it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["clip_latent_weights", "latent_kernel_mask", "is_latent_kernel_path"]

def _key_name(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def is_latent_kernel_path(path) -> bool:
    """Whether a ``jax.tree_util`` key path ends at a ``latent_kernel`` leaf."""
    return bool(path) and _key_name(path[-1]) == "latent_kernel"


def latent_kernel_mask(params) -> Any:
    """A pytree of bools, True at every ``latent_kernel`` leaf (for ``optax.masked``, Bop)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_latent_kernel_path(p), params)


def clip_latent_weights(params, clip_value: float | None):
    """Clip every ``latent_kernel`` leaf to ``[-clip_value, clip_value]``; others unchanged.

    BNN (Courbariaux et al. 2016) clips latent weights to [−1, 1] after each update, as
    Larq's ``weight_clip`` constraint does. ``clip_value=None`` returns ``params`` as is.
    Pure, so the trainer can call it inside its jitted step.
    """
    if clip_value is None:
        return params
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0 or None; got {clip_value!r}.")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.clip(v, -clip_value, clip_value) if is_latent_kernel_path(p) else v, params
    )

