"""XNOR-popcount kernels: dense and 2D convolution on bit-packed ±1 operands.

For ``a, w ∈ {−1, +1}^K`` packed as bits (:mod:`binax.packed.bits`: bit 1 = +1),
``a·w = (#agree) − (#disagree) = K − 2·popcount(a XOR w)``; popcounts summed over the
packed words. Padding bits count in the popcount only where the two operands differ, and
every binax producer pads with the same ``PAD_BIT``, so with the true ``K`` the result is
exactly the integer dot product ``sign(a) @ sign(w)`` (int32; |result| <= K).

Formulations (``method=``); all give identical integers:

* ``"xor_popcount"`` (default on CPU): one XLA loop fusion whose output ``(M, N/16, 16)``
  is one 512-bit vector of int32 lanes per ``(row, 16 columns)``, accumulated in a
  register over the words: per word ``vpxord`` (with a broadcast word of ``a``),
  ``vpopcntd``, ``vpaddd`` (AVX-512 VPOPCNTDQ). Two XLA:CPU behaviours shape it:
  a reduced dimension longer than 32 is split into ``reduce-window`` + ``reduce``,
  which no longer fuse with the XOR and popcount (the whole ``M×K/32×N`` intermediate
  would go to memory), so the word reduction is written as a sum of reductions over at
  most 32 words; and XLA prefers 256-bit vectors, so compile the caller's ``jax.jit``
  with ``compiler_options=CPU_COMPILER_OPTIONS`` for 512-bit ones (20–30 % faster).
  While every row of ``a`` streams over the whole weight, the weight must stay in
  cache: above ``FUSED_WEIGHT_BYTES`` the words go in groups of about
  ``GROUP_WEIGHT_BYTES`` through a ``fori_loop``, the accumulator making one trip to
  memory per group. (XLA picks the loop order from the output layout; nothing else
  blocks the loops, so cache blocking is limited to these two choices. Variants that
  keep column blocks of the weight in L1 need a transposed output, and XLA fuses the
  transpose back into the loop nest; writing blocks with ``dynamic_update_slice`` gets
  scalar code.)
* ``"xor_popcount_outer"``: an outer-product loop, ``fori_loop`` over words, each step
  ``acc += popcount(a[:, j, None] ^ w[None, j, :])``.
* ``"xor_popcount_broadcast"``: ``popcount(a[:, None, :] ^ wᵀ[None]).sum(-1)``.
  XLA materialises the broadcast; kept as the slow textbook baseline.
* ``"int8_dot"`` (default on GPU/TPU): unpack both operands to ±1 int8 and
  ``jnp.dot(..., preferred_element_type=int32)``. Not bitwise; on accelerators it runs on
  the int8 matrix units, which XLA exposes and 1-bit XOR MMA it does not. (This choice for
  GPU is reasoned, not measured here.)

``benchmarks/packed.py`` measures them against float32 ``jnp.dot``/``lax.conv``. What
bounds the speed-up on CPU: one 512-bit XOR-popcount step does 16·32 = 512 binary MACs in
about 1.5 cycles (``vpopcntd`` issues on one port, ``vpxord`` and ``vpaddd`` share the
other), about 340 per cycle, against 2 FMA units × 16 = 32 float32 MACs per cycle. At
both peaks, packed is ≈ 10.7× faster; any larger ratio comes from the float GEMM running
below its peak (XLA's reaches 60–65 %), any smaller one from the packed kernel running
below its own (im2col copies, weight streaming from L2, accumulator traffic).

Between binary layers no float activation is needed: :func:`threshold_to_bits` turns the
int32 accumulators into the next layer's packed bits with one integer compare per channel
(BatchNorm followed by sign is ``sign(γ)·sign(x − τ)``; the thresholds come from
:func:`binax.folding.scan_steps`, as the packed chain finds them).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from binax._checks import static_int
from binax.packed import geometry
from binax.packed.bits import PAD_BIT, WORD_BITS, num_words, pack_bits, unpack_bits

Array = jax.Array

__all__ = [
    "METHODS",
    "TILE",
    "FUSED_WEIGHT_BYTES",
    "CPU_COMPILER_OPTIONS",
    "default_method",
    "packed_dense",
    "packed_conv",
    "threshold_to_bits",
]

METHODS = ("xor_popcount", "xor_popcount_outer", "xor_popcount_broadcast", "int8_dot")

#: Output columns per accumulator vector: 16 int32 lanes fill one 512-bit register.
TILE = 16

#: A packed weight up to this size is reduced in one fused pass (every row of ``a``
#: streams over the whole weight, which must stay in cache) ...
FUSED_WEIGHT_BYTES = 160 * 1024
#: ... a larger one in groups of word rows about this big (at least ``MIN_GROUP_WORDS``
#: words: each group costs one read and write of the int32 accumulator, 16 words of work
#: per 64-byte accumulator vector at the minimum). Tuned with benchmarks/packed.py.
GROUP_WEIGHT_BYTES = 64 * 1024
MIN_GROUP_WORDS = 16

#: Per-``jax.jit`` XLA:CPU options for the packed kernels: 512-bit vectors (XLA:CPU
#: prefers 256 by default), worth 20–30 % on AVX-512 machines. Pass as
#: ``jax.jit(f, compiler_options=CPU_COMPILER_OPTIONS)`` on the outermost jit; a jit nested
#: inside another is inlined and its options are ignored. Only valid on the CPU backend.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

# Longest reduced dimension XLA:CPU keeps fused (see the module docstring).
_MAX_FUSED_REDUCE = 32
# Thresholds beyond ±2**30 act as ±inf for any accumulator |acc| <= K < 2**30, and are
# exact in float32 (2**31 − 1 is not).
_INT_INF = 2**30


def default_method(backend: str | None = None) -> str:
    """The formulation used for ``method="auto"``: bitwise on CPU, int8 matmul elsewhere."""
    backend = backend or jax.default_backend()
    return "xor_popcount" if backend == "cpu" else "int8_dot"


def _resolve_method(method: str) -> str:
    """``method`` checked; ``"auto"`` stays ``"auto"`` (chosen at lowering, :func:`_dense`)."""
    if method == "auto":
        return method
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; valid: 'auto', {', '.join(map(repr, METHODS))}.")
    return method


def _check_uint32(x: Array, what: str) -> None:
    if x.dtype != jnp.uint32:
        raise ValueError(
            f"{what} must be packed uint32 words (binax.packed.pack_bits); got dtype {x.dtype}."
        )


def _check_k(k, words: int, what: str = "k") -> int:
    k = static_int(k, what)
    if num_words(k) != words:
        raise ValueError(
            f"{what}={k} needs {num_words(k)} words of 32 bits, but the packed reduction axis has "
            f"{words} words (valid {what}: {32 * (words - 1) + 1}..{32 * words})."
        )
    return k


def _popcount(x: Array) -> Array:
    return lax.population_count(x).astype(jnp.int32)


def _spans(n: int, longest: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into near-equal spans of at most ``longest``."""
    parts = -(-n // longest)
    size = -(-n // parts)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------- dense


def _xor_popcount_sum(a: Array, w: Array, start, size: int) -> Array:
    """``sum_j popcount(a[m, j] ^ w[j, c·T + l])`` over words ``[start, start + size)``.

    ``a`` (M, Kw), ``w`` (Kw, NC·T) → (M, NC, T) int32, as a sum of reductions of at most
    32 words. ``start`` may be traced (inside the group loop). The (NC, T) split of the
    columns is only a view: XLA folds it into the loop nest's indexing, reading ``w`` in
    place, which makes every 512-bit vector of the output a register accumulator.
    """
    nc = w.shape[1] // TILE
    acc = None
    for s, e in _spans(size, _MAX_FUSED_REDUCE):
        aj = lax.dynamic_slice_in_dim(a, start + s, e - s, 1)
        wj = lax.dynamic_slice_in_dim(w, start + s, e - s, 0).reshape(e - s, nc, TILE).transpose(1, 0, 2)
        part = _popcount(aj[:, None, :, None] ^ wj[None, :, :, :]).sum(2)
        acc = part if acc is None else acc + part
    return acc


def _auto_group_words(kw: int, n: int) -> int:
    row_bytes = n * 4
    if kw * row_bytes <= FUSED_WEIGHT_BYTES:
        return kw
    target = max(MIN_GROUP_WORDS, GROUP_WEIGHT_BYTES // row_bytes)
    # A divisor of Kw near the target avoids padding (copying) the im2col patches.
    divisor = max(d for d in range(1, target + 1) if kw % d == 0)
    return divisor if 2 * divisor >= target else target


def _xor_popcount(a: Array, w: Array, group_words: int | None = None) -> Array:
    """Popcount of ``a XOR w`` summed over words: (M, Kw) × (Kw, N) → (M, N) int32."""
    m, kw = a.shape
    n = w.shape[1]
    n_pad = -(-n // TILE) * TILE
    if n_pad != n:
        w = jnp.pad(w, ((0, 0), (0, n_pad - n)))  # extra output columns, dropped below
    if group_words is None:
        group_words = _auto_group_words(kw, n_pad)
    group_words = min(static_int(group_words, "group_words"), kw)
    if group_words == kw:
        acc = _xor_popcount_sum(a, w, 0, kw)
    else:
        # Zero words in both operands XOR to 0: padding the word axis changes nothing.
        groups = -(-kw // group_words)
        pad = groups * group_words - kw
        if pad:
            a = jnp.pad(a, ((0, 0), (0, pad)))
            w = jnp.pad(w, ((0, pad), (0, 0)))

        def body(g, acc):
            return acc + _xor_popcount_sum(a, w, g * group_words, group_words)

        acc = lax.fori_loop(0, groups, body, jnp.zeros((m, n_pad // TILE, TILE), jnp.int32))
    return acc.reshape(m, n_pad)[:, :n]


def _outer_loop(a: Array, w: Array, unroll: int = 8) -> Array:
    def body(j, acc):
        aj = lax.dynamic_index_in_dim(a, j, 1, keepdims=True)
        wj = lax.dynamic_index_in_dim(w, j, 0, keepdims=True)
        return acc + _popcount(aj ^ wj)

    kw = a.shape[1]
    acc = jnp.zeros((a.shape[0], w.shape[1]), jnp.int32)
    return lax.fori_loop(0, kw, body, acc, unroll=min(unroll, kw))


def _broadcast(a: Array, w: Array) -> Array:
    return _popcount(a[:, None, :] ^ w.T[None, :, :]).sum(-1)


def _int8_dot(a: Array, w: Array, k: int) -> Array:
    """±1 int8 matmul over all 32·Kw bit positions, minus the padding positions.

    Padding bits are equal in both operands, so each contributes exactly +1.
    """
    bits = a.shape[1] * WORD_BITS
    a8 = unpack_bits(a, bits, axis=1, dtype=jnp.int8)
    w8 = unpack_bits(w, bits, axis=0, dtype=jnp.int8)
    return jnp.dot(a8, w8, preferred_element_type=jnp.int32) - (bits - k)


def packed_dense(
    a_packed, w_packed, k: int, *, method: str = "auto", group_words: int | None = None
) -> Array:
    """±1 matrix product from packed operands: ``K − 2·popcount(a XOR w)``.

    Args:
      a_packed: ``(..., K/32)`` uint32, ``pack_bits(a, axis=-1)``.
      w_packed: ``(K/32, N)`` uint32, ``pack_bits(w, axis=0)`` of a ``(K, N)`` kernel
        (output channel last, as binax kernels are).
      k: the true reduction length ``K`` (padding bits do not count).
      method: ``"auto"`` (:func:`default_method`) or one of ``METHODS``.
      group_words: ``"xor_popcount"`` only: words reduced per pass over the accumulator
        (default: all of them when the packed weight fits ``FUSED_WEIGHT_BYTES``, else
        about ``GROUP_WEIGHT_BYTES`` of weight rows). A tuning knob; the result is the same.

    Returns:
      ``(..., N)`` int32, exactly ``sign(a) @ sign(w)`` with ``sign(0) = +1``.
    """
    a = jnp.asarray(a_packed)
    w = jnp.asarray(w_packed)
    _check_uint32(a, "a_packed")
    _check_uint32(w, "w_packed")
    if w.ndim != 2:
        raise ValueError(f"w_packed must be (K/32, N) (pack_bits(w, axis=0)); got shape {tuple(w.shape)}.")
    if a.ndim < 1 or a.shape[-1] != w.shape[0]:
        raise ValueError(
            f"a_packed has {a.shape[-1] if a.ndim else 0} words on its last axis, w_packed {w.shape[0]} rows."
        )
    k = _check_k(k, w.shape[0])
    lead = a.shape[:-1]
    out = _dense(a.reshape(-1, a.shape[-1]), w, k, _resolve_method(method), group_words)
    return out.reshape(*lead, w.shape[1])


def _dense(a: Array, w: Array, k: int, method: str, group_words: int | None = None) -> Array:
    """(M, Kw) × (Kw, N) → (M, N) int32; ``k`` counts the non-padding bit positions.

    ``"auto"`` is :func:`default_method` of the platform the code is lowered for (not
    the host's): ``lax.platform_dependent`` keeps only that platform's formulation, so a
    ``jax.export`` for ``("cuda",)`` or ``("tpu",)`` made on a CPU gets ``int8_dot``.
    """
    if method == "auto":
        cpu, other = default_method("cpu"), default_method("cuda")
        return lax.platform_dependent(
            a, w,
            cpu=lambda a, w: _dense(a, w, k, cpu, group_words),
            default=lambda a, w: _dense(a, w, k, other, group_words),
        )
    if method == "xor_popcount":
        return k - 2 * _xor_popcount(a, w, group_words)
    if method == "int8_dot":
        return _int8_dot(a, w, k)
    pop = _outer_loop(a, w) if method == "xor_popcount_outer" else _broadcast(a, w)
    return k - 2 * pop


# ------------------------------------------------------------------------------ conv


def _ones_words(c: int) -> np.ndarray:
    """Packed words of ``c`` values +1: all bits set, but ``PAD_BIT`` past position ``c``."""
    words = np.full(num_words(c), 0xFFFFFFFF, np.uint32)
    if c % WORD_BITS:
        tail = (1 << (c % WORD_BITS)) - 1
        words[-1] = tail if PAD_BIT == 0 else 0xFFFFFFFF
    return words


def packed_conv(
    x_packed,
    w_packed,
    in_channels: int,
    strides: int | Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    pad_value: float = 1.0,
    *,
    method: str = "auto",
    group_words: int | None = None,
) -> Array:
    """2D convolution of ±1 images with ±1 kernels from channel-packed operands.

    Equals ``lax.conv_general_dilated(sign(x), sign(w), strides, padding)`` in NHWC/HWIO
    with the padded pixels set to ``pad_value`` (Larq's ``pad_values``) instead of 0.
    Patches of ``(kh, kw, C/32)`` words are gathered (im2col) and reduced by
    :func:`packed_dense` over ``K = kh·kw·C``.

    Args:
      x_packed: ``(B, H, W, ceil(C/32))`` uint32, ``pack_bits(x, axis=-1)``.
      w_packed: ``(kh, kw, ceil(C/32), O)`` uint32, ``pack_bits(w, axis=2)`` of an HWIO kernel.
      in_channels: the true number of input channels ``C``.
      strides: an int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"``, an int or ``((top, bottom), (left, right))``
        (:func:`binax.packed.geometry.padding_pairs`).
      pad_value: the value of padded pixels: ``+1`` (all-ones words), ``-1`` (zero words)
        or ``0`` (computed as ``-1`` plus the per-position correction
        ``sum over padded taps of sum_c sign(w)``, which does not depend on the image).
      method, group_words: as in :func:`packed_dense`.

    Returns:
      ``(B, Ho, Wo, O)`` int32.
    """
    x = jnp.asarray(x_packed)
    w = jnp.asarray(w_packed)
    _check_uint32(x, "x_packed")
    _check_uint32(w, "w_packed")
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(
            f"x_packed must be (B, H, W, C/32) and w_packed (kh, kw, C/32, O); got shapes "
            f"{tuple(x.shape)} and {tuple(w.shape)}."
        )
    if x.shape[3] != w.shape[2]:
        raise ValueError(f"x_packed has {x.shape[3]} channel words, w_packed {w.shape[2]}.")
    c = _check_k(in_channels, x.shape[3], "in_channels")
    if pad_value not in (-1, 0, 1):
        raise ValueError(f"pad_value must be -1, 0 or +1 (the padded pixels' value); got {pad_value!r}.")
    strides = geometry.ntuple(strides, 2, "strides")
    window = (w.shape[0], w.shape[1])
    in_hw = (x.shape[1], x.shape[2])
    pads = geometry.padding_pairs(padding, in_hw, window, strides, nonnegative=True)
    out_hw = geometry.output_size(in_hw, window, strides, pads)

    if pad_value == 1 and any(lo or hi for lo, hi in pads):
        # All C channels +1; the word's padding bits keep PAD_BIT like the kernel's.
        pad_word = jnp.asarray(_ones_words(c))
        xp = jnp.pad(x ^ pad_word, ((0, 0), pads[0], pads[1], (0, 0))) ^ pad_word
    else:
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))  # zero words: every channel -1
    patches = geometry.im2col(xp, window, strides, out_hw)
    o = w.shape[3]
    # Every tap holds C true channels in its words; its padding bits agree with the kernel's.
    k = window[0] * window[1] * c
    out = _dense(patches, w.reshape(-1, o), k, _resolve_method(method), group_words)
    out = out.reshape(x.shape[0], *out_hw, o)
    if pad_value == 0:
        # Padded pixel: 0 instead of -1 adds +sum_c sign(w[tap, c, o]) per padded tap.
        tap_sums = 2 * _popcount(w.reshape(-1, w.shape[2], o)).sum(1) - c  # PAD_BIT = 0 adds nothing
        oob = jnp.asarray(geometry.out_of_bounds(in_hw, window, strides, pads, out_hw), jnp.int32)
        out = out + jnp.einsum("hwt,to->hwo", oob, tap_sums)[None]
    return out


# ---------------------------------------------------------------- binary activations


def threshold_to_bits(acc, threshold, flip=None, axis: int = -1) -> Array:
    """Next layer's packed bits from int32 accumulators: ``bit = (acc >= threshold) XOR flip``.

    With ``threshold``/``flip`` of BatchNorm followed by sign (``sign(γ)·sign(x − τ)``,
    BinaryBN; :func:`binax.folding.scan_steps`) this is that pair, computed without float
    activations.

    Args:
      acc: integer accumulators, e.g. ``(..., C)`` from :func:`packed_dense`/:func:`packed_conv`.
      threshold: broadcastable to ``acc`` (per channel: shape ``(C,)``). Integers are
        compared as they are; real values are compared exactly as ``acc >= ceil(threshold)``
        (``acc`` is an integer), ``±inf`` allowed.
      flip: optional booleans broadcastable to ``acc``; True inverts the bit (``γ < 0``).
      axis: the channel axis to pack (32 channels per word, ``PAD_BIT`` padding).

    Returns:
      ``uint32`` words, ``acc.shape[axis]`` replaced by ``ceil(C / 32)``.
    """
    acc = jnp.asarray(acc)
    if not jnp.issubdtype(acc.dtype, jnp.integer):
        raise ValueError(f"threshold_to_bits takes integer accumulators; got dtype {acc.dtype}.")
    t = jnp.asarray(threshold)
    if jnp.issubdtype(t.dtype, jnp.floating):
        t = jnp.clip(jnp.ceil(t), -_INT_INF, _INT_INF).astype(jnp.int32)
    elif not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"threshold must be an integer or real array; got dtype {t.dtype}.")
    bits = acc >= t
    if flip is not None:
        bits = bits ^ jnp.asarray(flip, jnp.bool_)
    return pack_bits(bits, axis=axis)
