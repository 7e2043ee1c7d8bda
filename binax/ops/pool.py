"""Max pooling over non-overlapping windows with a cheap backward.

``flax.linen.max_pool`` is ``lax.reduce_window``; its gradient on XLA:CPU goes through a
variadic reduce-window that tracks indices and a scatter, about 7× the time of the
forward pass at VGG-small shapes. When the windows tile the input (window = strides,
VALID), the pool is a reshape and a max, and its gradient is elementwise: each window's
cotangent goes to its FIRST maximal element in row-major order — the element
``select_and_scatter_add`` (and so ``nn.max_pool``'s gradient) picks, which matters
because the integer-valued outputs of binary layers tie often.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["max_pool"]


def _tiles(x: Array, window: tuple[int, int]) -> Array:
    n, h, w, c = x.shape
    kh, kw = window
    return x.reshape(n, h // kh, kh, w // kw, kw, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: Array, window: tuple[int, int]) -> Array:
    return _tiles(x, window).max(axis=(2, 4))


def _tiled_max_fwd(x, window):
    return _tiles(x, window).max(axis=(2, 4)), x


def _tiled_max_bwd(window, x, g):
    t = _tiles(x, window)
    m = t.max(axis=(2, 4), keepdims=True)
    g = g[:, :, None, :, None, :]
    kh, kw = window
    taken = jnp.zeros(m.shape, jnp.bool_)
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            hit = (t[:, :, i : i + 1, :, j : j + 1, :] == m) & ~taken
            taken = taken | hit
            cols.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
        rows.append(jnp.concatenate(cols, axis=4))
    return (jnp.concatenate(rows, axis=2).reshape(x.shape),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


def max_pool(x: Array, window: Sequence[int] = (2, 2), strides: Sequence[int] | None = None, padding: str = "VALID") -> Array:
    """``nn.max_pool(x, window, strides, padding)`` for NHWC ``x``, same values and gradients.

    Non-overlapping VALID windows (``strides == window``, the VGG/AlexNet-style 2×2 pool)
    take the reshape-and-max path described in the module docstring; rows and columns that
    no window covers are dropped as VALID drops them (their gradient is 0). Anything else
    is ``nn.max_pool``.
    """
    window = tuple(int(k) for k in window)
    strides = window if strides is None else tuple(int(s) for s in strides)
    if x.ndim != 4 or len(window) != 2 or strides != window or padding != "VALID":
        return nn.max_pool(x, window, strides=strides, padding=padding)
    kh, kw = window
    h, w = (x.shape[1] // kh) * kh, (x.shape[2] // kw) * kw
    if h == 0 or w == 0:
        raise ValueError(f"a {window} pooling window does not fit the input of shape {tuple(x.shape)}.")
    if (h, w) != x.shape[1:3]:
        x = x[:, :h, :w, :]
    return _tiled_max(x, window)
