"""Bit packing: 32 binary values per ``uint32`` word along one axis.

A binary tensor (``±1`` values, or booleans) is stored one bit per value, which is what
makes binary weights 32× smaller than float32 and lets inference compute ±1 dot products
with XOR and popcount (``binax.export.kernels``).

Conventions (the packed file format and the kernels rely on them):

* **Bit value.** bit = 1 for ``+1``: for numeric input, ``x >= 0`` gives 1, so
  ``sign(0) = +1`` as everywhere in binax; NaN gives 0 (``-1``). For boolean input the
  bit is the boolean itself.
* **Bit order.** Element ``i`` of the packed axis goes to word ``i // 32``, bit
  ``i % 32``, least significant bit first ("little-endian within a word"): the word's
  integer value is ``sum_b bit[32·w + b] · 2**b``.
* **Padding.** The axis is padded up to a multiple of 32 with ``PAD_BIT = 0`` (the value
  ``-1``). Every producer of packed data in binax (``pack_bits``, ``threshold_to_bits``)
  pads with this same bit, so when two packed operands meet in an XOR, their padding
  bits agree, XOR to 0, and add nothing to a popcount.

Both functions are pure and jit-able (the packed axis and ``n`` are static).
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp

from binax._checks import static_int

Array = jax.Array

__all__ = ["PAD_BIT", "WORD_BITS", "pack_bits", "unpack_bits", "num_words", "packed_size_bytes"]

#: Bits per packed word.
WORD_BITS = 32

#: The bit that fills a packed axis up to a multiple of 32 (0, i.e. the value -1).
PAD_BIT = 0


def num_words(n: int) -> int:
    """Words that hold ``n`` bits: ``ceil(n / 32)``."""
    return -(-static_int(n, "n", minimum=0) // WORD_BITS)


def _axis(axis, ndim: int, what: str = "axis") -> int:
    try:
        ax = operator.index(axis)
    except TypeError:
        raise ValueError(f"{what} must be an integer; got {axis!r}.") from None
    if not -ndim <= ax < ndim:
        raise ValueError(f"{what}={axis} is out of range for an array of rank {ndim}.")
    return ax % ndim


def pack_bits(x, axis: int = -1) -> Array:
    """Packs the signs of ``x`` along ``axis`` into ``uint32`` words.

    ``word[..., w, ...] = sum_b bit(x[..., 32·w + b, ...]) << b`` with
    ``bit(v) = 1[v >= 0]`` (numeric) or ``v`` (bool); the axis of length ``n`` becomes
    ``ceil(n / 32)`` words, the missing positions of the last word hold ``PAD_BIT``.

    Args:
      x: a numeric (``±1`` or any real values: only the sign is kept) or boolean array.
      axis: the axis to pack (for a dot product, the reduction axis).

    Returns:
      ``uint32`` array with ``x.shape[axis]`` replaced by ``ceil(x.shape[axis] / 32)``.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("pack_bits needs an array of rank >= 1; got a scalar.")
    if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.number)):
        raise ValueError(f"pack_bits takes a numeric or boolean array; got dtype {x.dtype}.")
    ax = _axis(axis, x.ndim)
    bits = x if x.dtype == jnp.bool_ else x >= 0
    bits = jnp.moveaxis(bits, ax, -1)
    n = bits.shape[-1]
    nw = num_words(n)
    pad = nw * WORD_BITS - n
    if pad:
        bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)], constant_values=bool(PAD_BIT))
    bits = bits.reshape(*bits.shape[:-1], nw, WORD_BITS).astype(jnp.uint32)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    # The shifted bits are disjoint, so their sum is their bitwise OR (and cannot overflow).
    words = jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)
    return jnp.moveaxis(words, -1, ax)


def unpack_bits(words, n: int, axis: int = -1, *, dtype=jnp.bool_) -> Array:
    """Inverse of :func:`pack_bits`: the first ``n`` bits along ``axis``.

    Args:
      words: ``uint32`` array packed along ``axis``.
      n: the unpacked length (``ceil(n / 32)`` must equal ``words.shape[axis]``).
      axis: the packed axis.
      dtype: ``bool`` (default) gives the bits; a numeric dtype gives ``±1`` values
        (``2·bit − 1``) in that dtype.

    Returns:
      Array with ``words.shape[axis]`` replaced by ``n``.
    """
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"unpack_bits takes uint32 words; got dtype {words.dtype}.")
    if words.ndim == 0:
        raise ValueError("unpack_bits needs an array of rank >= 1; got a scalar.")
    ax = _axis(axis, words.ndim)
    n = static_int(n, "n", minimum=0)
    if num_words(n) != words.shape[ax]:
        raise ValueError(
            f"n={n} needs {num_words(n)} words, but axis {axis} of the packed array has "
            f"{words.shape[ax]}."
        )
    w = jnp.moveaxis(words, ax, -1)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    bits = ((w[..., None] >> shifts) & jnp.uint32(1)).astype(jnp.bool_)
    bits = bits.reshape(*w.shape[:-1], w.shape[-1] * WORD_BITS)[..., :n]
    bits = jnp.moveaxis(bits, -1, ax)
    if jnp.dtype(dtype) == jnp.bool_:
        return bits
    return jnp.where(bits, 1, -1).astype(dtype)


def packed_size_bytes(shape: Sequence[int], axis: int = -1) -> int:
    """Bytes of an array of ``shape`` packed along ``axis`` (4 bytes per 32-bit word).

    Compare with ``4 * prod(shape)`` for float32: the ratio approaches 32 when
    ``shape[axis]`` is a multiple of 32.
    """
    shape = tuple(static_int(s, "shape entries", minimum=0) for s in shape)
    if not shape:
        raise ValueError("packed_size_bytes needs a shape of rank >= 1; got ().")
    ax = _axis(axis, len(shape))
    rest = math.prod(shape[:ax] + shape[ax + 1 :])
    return int(rest * num_words(shape[ax]) * (WORD_BITS // 8))

