"""Helpers every binarizer module shares: float32 schedule values, sign's forward, STE masks
and the per-output-channel reduction of kernels (the last axis is the output channel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


Array = jax.Array


def _f32(v) -> Array:
    """A schedule value as a float32 array (traced or not); float32 keeps t**k exact enough."""
    return jnp.asarray(v, dtype=jnp.float32)


def _zero_like(v: Array) -> Array:
    return jnp.zeros_like(v)


def _sign_forward(x: Array) -> Array:
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _sech2(z: Array) -> Array:
    """``1 − tanh(z)**2`` as ``1 / cosh(z)**2``: no cancellation for large |z|.

    In float32, ``1 − tanh(6)**2`` keeps only 3 significant digits; this form keeps them
    all, and underflows to 0 (not NaN) where cosh overflows.
    """
    c = jnp.cosh(z)
    return 1.0 / (c * c)


def _in_range(x: Array, lo, hi) -> Array:
    return ((x >= lo) & (x <= hi)).astype(x.dtype)


def _within_clip(x: Array, clip_value: Array, dtype) -> Array:
    """``1[|x| <= clip_value]`` compared in float32.

    Comparing in float32 keeps the boundary where the caller put it: casting a clip value
    such as 0.3 to bfloat16 would move it, and a bfloat16 ``x`` is exact in float32.
    """
    return (jnp.abs(x.astype(jnp.float32)) <= clip_value).astype(dtype)


def _clip_or_inf(clip_value) -> Array:
    """A clip value as float32; ``None`` (no clipping, as in Larq) becomes +inf."""
    return _f32(jnp.inf if clip_value is None else clip_value)


def _check_per_channel_kernel(w: Array, fn_name: str) -> None:
    if w.ndim < 2:
        raise ValueError(
            f"{fn_name} needs a kernel of rank >= 2 with the output channel last "
            f"(Dense (in, out), Conv (h, w, in, out)); got shape {tuple(w.shape)} (rank {w.ndim})."
        )


def _reduce_axes(w: Array) -> tuple[int, ...]:
    """Every axis but the last (output channel)."""
    return tuple(range(w.ndim - 1))


def _channel_mean_abs(w: Array) -> Array:
    """``mean|w|`` per output channel, accumulated in float32."""
    return jnp.mean(jnp.abs(w.astype(jnp.float32)), axis=_reduce_axes(w), keepdims=True)
