"""Convolution geometry, channels last: window tuples, explicit padding, output sizes,
im2col, and the padded convolution every binax layer computes.

One implementation for training (``binax.layers``, ``binax.ops``) and inference
(``binax.packed.kernels``, ``binax.export``), so a layer and its packed form can never
disagree about where a window sits.

Conventions: inputs are ``(N, *spatial, C)``, kernels ``(*window, C / groups, O)``;
``padding`` is ``'SAME'``, ``'VALID'``, one int for every side, or one int or
``(low, high)`` pair per spatial axis, resolved to ``(low, high)`` pairs exactly as
``lax.conv_general_dilated`` resolves ``'SAME'``/``'VALID'`` (with the dilated window).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = ["ntuple", "padding_pairs", "output_size", "im2col", "out_of_bounds", "conv", "padded_conv"]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def ntuple(value, n: int, what: str, minimum: int = 1) -> tuple[int, ...]:
    """``value`` as ``n`` ints ``>= minimum``: an int is repeated, a sequence must have ``n``.

    Raises a ``ValueError`` naming ``what`` and the bad value.
    """
    if _is_int(value):
        value = (value,) * n
    try:
        out = tuple(value)
    except TypeError:
        out = None
    if out is None or len(out) != n or not all(_is_int(v) and v >= minimum for v in out):
        raise ValueError(f"{what} must be an int or a sequence of {n} ints >= {minimum}; got {value!r}.")
    return tuple(int(v) for v in out)


def padding_pairs(
    padding: Any,
    in_spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int] | None = None,
    *,
    nonnegative: bool = False,
) -> tuple[tuple[int, int], ...]:
    """Explicit ``(low, high)`` padding per spatial axis.

    ``'SAME'``/``'VALID'`` are resolved as ``lax`` does (``lax.padtype_to_pads`` on the
    dilated window ``(k − 1)·d + 1``); an int pads every side by it; a sequence gives one
    int or ``(low, high)`` pair per axis. Negative pairs (``lax`` crops) are an error with
    ``nonnegative=True``, as a padding with a value needs.
    """
    pairs = _padding_pairs(padding, in_spatial, window, strides, dilation)
    if nonnegative and any(p < 0 for pair in pairs for p in pair):
        raise ValueError(f"padding must be non-negative (low, high) pairs here; got {padding!r}.")
    return pairs


def _padding_pairs(padding, in_spatial, window, strides, dilation) -> tuple[tuple[int, int], ...]:
    nd = len(window)
    dilation = (1,) * nd if dilation is None else tuple(dilation)
    bad = f"padding must be 'SAME', 'VALID', an int or one int or (low, high) pair per spatial axis ({nd}); got {padding!r}."
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("SAME", "VALID"):
            raise ValueError(bad)
        effective = [(k - 1) * d + 1 for k, d in zip(window, dilation)]
        return tuple((int(lo), int(hi)) for lo, hi in lax.padtype_to_pads(tuple(in_spatial), effective, tuple(strides), mode))
    if _is_int(padding):
        return ((int(padding), int(padding)),) * nd
    try:
        pairs = tuple((p, p) if _is_int(p) else tuple(p) for p in padding)
    except TypeError:
        raise ValueError(bad) from None
    if len(pairs) != nd or not all(len(p) == 2 and all(_is_int(v) for v in p) for p in pairs):
        raise ValueError(bad)
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def output_size(
    in_spatial: Sequence[int], window: Sequence[int], strides: Sequence[int], pads, dilation: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Output spatial size: ``(size + low + high − ((k − 1)·d + 1)) // s + 1`` per axis.

    Raises a ``ValueError`` when the window does not fit somewhere.
    """
    dilation = (1,) * len(window) if dilation is None else tuple(dilation)
    out = tuple(
        (size + lo + hi - ((k - 1) * d + 1)) // s + 1
        for size, (lo, hi), k, s, d in zip(in_spatial, pads, window, strides, dilation)
    )
    if min(out) < 1:
        raise ValueError(
            f"the {tuple(window)} window does not fit the {tuple(in_spatial)} input with padding {tuple(pads)}."
        )
    return out


def im2col(xp: Array, window, strides, out_hw) -> Array:
    """(B, Hp, Wp, C) → (B·Ho·Wo, kh·kw·C) patches in (i, j, channel) order, as HWIO kernels.

    ``xp`` is already padded; works on any dtype (packed uint32 words or float values).
    """
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    b, cw = xp.shape[0], xp.shape[3]
    taps = [
        lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cw), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps, axis=3).reshape(b * ho * wo, kh * kw * cw)


def out_of_bounds(in_hw, window, strides, pads, out_hw) -> np.ndarray:
    """``oob[ho, wo, i·kw + j]``: tap (i, j) of output (ho, wo) reads a padded pixel (2-d)."""
    masks = []
    for size, k, s, (lo, _), o in zip(in_hw, window, strides, pads, out_hw):
        pos = np.arange(o)[:, None] * s + np.arange(k)[None, :] - lo  # (out, tap)
        masks.append((pos < 0) | (pos >= size))
    oob = masks[0][:, None, :, None] | masks[1][None, :, None, :]  # (Ho, Wo, kh, kw)
    return oob.reshape(out_hw[0], out_hw[1], window[0] * window[1])


def conv(x: Array, kernel: Array, strides, pads, dilation=None, groups: int = 1) -> Array:
    """N-d channels-last convolution (1 to 3 spatial axes) with explicit ``(low, high)`` pads."""
    nd = kernel.ndim - 2
    if not 1 <= nd <= 3:
        raise ValueError(f"Convolutions of {nd} spatial dimensions are not supported (1 to 3 are).")
    spatial = "DHW"[-nd:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=tuple(strides),
        padding=tuple(pads),
        rhs_dilation=None if dilation is None else tuple(dilation),
        dimension_numbers=dn,
        feature_group_count=groups,
    )


def padded_conv(x: Array, kernel: Array, strides, padding, dilation=None, groups: int = 1, pad_value=0.0) -> Array:
    """Pad ``x`` with ``pad_value``, then a VALID convolution (``padding`` as :func:`padding_pairs`).

    Zero is not a binary value: a binarized input pads with a value of its own set (+1 by
    default in binax layers). ``pad_value`` may be a traced array (ABC-Net pads with
    ``Σβ_n·p``); a Python 0 is an ordinary zero-padded convolution.
    """
    nd = kernel.ndim - 2
    strides = tuple(strides)
    dilation = (1,) * nd if dilation is None else tuple(dilation)
    zero = isinstance(pad_value, (int, float)) and pad_value == 0
    pads = padding_pairs(padding, x.shape[1:-1], kernel.shape[:nd], strides, dilation, nonnegative=not zero)
    if zero:
        return conv(x, kernel, strides, pads, dilation, groups)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)], mode="constant", constant_values=jnp.asarray(pad_value, x.dtype))
    return conv(x, kernel, strides, ((0, 0),) * nd, dilation, groups)
