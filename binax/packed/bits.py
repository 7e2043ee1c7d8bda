"""Bit packing: 32 binary values per ``uint32`` word along one axis.

A binary tensor (``±1`` values, or booleans) is stored one bit per value, which is what
makes binary weights 32× smaller than float32 and lets training and inference compute ±1
dot products with XOR and popcount (:mod:`binax.packed.kernels`).

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

``pack_bits``/``unpack_bits`` are pure and jit-able (the packed axis and ``n`` are
static); ``pack_bits_np`` and ``column_sums`` are their host (NumPy) counterparts for
export time, with the same layout.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from binax._checks import static_int

Array = jax.Array

__all__ = [
    "PAD_BIT",
    "WORD_BITS",
    "pack_bits",
    "unpack_bits",
    "num_words",
    "packed_size_bytes",
    "pack_bits_np",
    "column_sums",
]

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
    bits = (x if x.dtype == jnp.bool_ else x >= 0).astype(jnp.uint32)
    n = x.shape[ax]
    nw = num_words(n)
    if nw * WORD_BITS != n:
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, nw * WORD_BITS - n)
        bits = jnp.pad(bits, pad, constant_values=jnp.uint32(PAD_BIT))
    # The axis is split in place, (..., n, ...) -> (..., words, 32, ...), and reduced over
    # the 32: moving it last and back would let XLA:CPU give the words a transposed layout
    # inside a larger program (a strided pass over a whole kernel, 10x this reduction).
    bits = bits.reshape(*x.shape[:ax], nw, WORD_BITS, *x.shape[ax + 1 :])
    shift_shape = [1] * bits.ndim
    shift_shape[ax + 1] = WORD_BITS
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape(shift_shape)
    # The shifted bits are disjoint, so their sum is their bitwise OR (and cannot overflow).
    return jnp.sum(bits << shifts, axis=ax + 1, dtype=jnp.uint32)


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



def pack_bits_np(bits, axis: int) -> np.ndarray:
    """:func:`pack_bits` of host booleans in NumPy (export time, no compilation); same words."""
    bits = np.moveaxis(np.asarray(bits, bool), axis, -1)
    pad = -bits.shape[-1] % WORD_BITS
    if pad:
        fill = np.full(bits.shape[:-1] + (pad,), bool(PAD_BIT))
        bits = np.concatenate([bits, fill], axis=-1)
    # packbits keeps the moved axis' strides; the 4-byte view needs a contiguous last axis
    # (without padding, e.g. 128 inputs, nothing above made a copy).
    words = np.ascontiguousarray(np.packbits(bits, axis=-1, bitorder="little")).view("<u4").astype(np.uint32)
    return np.moveaxis(words, -1, axis)


def column_sums(bits_packed: np.ndarray, n: int) -> np.ndarray:
    """``S_b = Σ b`` over every ``±1`` value of each output channel (last axis) of a packed kernel.

    Padding bits are ``PAD_BIT = 0`` and add nothing to the popcount; ``n`` is the number
    of true values summed per output channel. Host NumPy, int32.
    """
    ones = np.unpackbits(np.ascontiguousarray(bits_packed).view(np.uint8)).reshape(*bits_packed.shape, 32)
    per_out = ones.sum(axis=-1).reshape(-1, bits_packed.shape[-1]).sum(axis=0)
    return (2 * per_out.astype(np.int64) - n).astype(np.int32)
