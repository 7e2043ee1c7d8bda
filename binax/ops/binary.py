"""Binary convolution and dense products with an exact XNOR-popcount forward.

See the package docstring (:mod:`binax.ops`) for the formulas and the choice of
implementation. Everything here is a pure function of arrays and static settings.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from binax import binarizers
from binax.packed import geometry
from binax.packed.bits import pack_bits, unpack_bits
from binax.packed.kernels import packed_conv, packed_dense

Array = jax.Array

__all__ = [
    "IMPLS",
    "default_impl",
    "fast_path_supported",
    "binary_conv2d",
    "binary_dense",
]

IMPLS = ("auto", "xnor", "xla")

# Pad values the packed forward represents: +1 and −1 as bits, 0 by a per-position correction.
_PACKED_PAD_VALUES = (-1.0, 0.0, 1.0)

_DN = ("NHWC", "HWIO", "NHWC")


def default_impl(backend: str | None = None) -> str:
    """``"xnor"`` on CPU, ``"xla"`` elsewhere (native convolutions on GPU/TPU)."""
    backend = backend or jax.default_backend()
    return "xnor" if backend == "cpu" else "xla"


def fast_path_supported(input_quantizer: Any, kernel_quantizer: Any) -> bool:
    """Whether a layer with these quantizer specs computes a product of ±1 and ±α values.

    Read from the quantizers' descriptors (``binax.binarizers.describe``): the input's
    forward must be ``"sign"`` (exactly ±1 while training: not ``tanh_sign``, not {0, 1}),
    the kernel's ``"sign"`` or ``"scaled_sign"`` (±α per output channel). An undeclared
    callable's values are unknown, so it never qualifies.
    """
    if input_quantizer is None or kernel_quantizer is None:
        return False
    return binarizers.describe(input_quantizer).is_sign and binarizers.describe(kernel_quantizer).is_scaled_sign


def _check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"Unknown impl {impl!r}; valid: {', '.join(map(repr, IMPLS))}.")
    return impl


def _by_platform(fns: dict, *args):
    """``fns[default_impl(platform)](*args)`` for the platform the code is LOWERED for.

    ``lax.platform_dependent`` stages both formulations and picks one at lowering, so a
    step lowered on a CPU host for ``("cuda",)`` or ``("tpu",)`` (``jax.export``) gets the
    GPU/TPU choice, not the host's. Lowering for one platform keeps only its branch: the
    compiler never sees the other (nor a conditional).
    """
    cpu, other = default_impl("cpu"), default_impl("cuda")
    if cpu == other:  # e.g. default_impl patched to one answer (benchmarks/vs_peers.py)
        return fns[cpu](*args)
    return lax.platform_dependent(*args, cpu=fns[cpu], default=fns[other])


def _channel_scale(kernel: Array) -> Array:
    """``α`` per output channel: ``max |k|`` over every other axis (``k = ±α`` by contract)."""
    return jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=tuple(range(kernel.ndim - 1)))


# ---------------------------------------------------------------------- convolution


def _xla_conv(x, kernel, strides, pads, pad_value):
    """The plain formulation: pad with ``pad_value``, then a VALID convolution."""
    if pad_value != 0 and any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=jnp.asarray(pad_value, x.dtype))
        pads = ((0, 0), (0, 0))
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), strides, pads, dimension_numbers=_DN)


def _col2im_grad(g, kernel, strides, pads, in_hw):
    """∂x of the convolution: ``g·Kᵀ`` (one GEMM) scattered back to the input positions.

    Column block ``(i, j)`` of ``g·Kᵀ`` is what tap ``(i, j)`` read; it goes back to padded
    position ``(i + s_h·h_o, j + s_w·w_o)`` (an interior-padded ``lax.pad``), the blocks are
    summed, and the padding is cropped off.
    """
    kh, kw, c, o = kernel.shape
    n, ho, wo, _ = g.shape
    (sh, sw), ((ph, _), (pw, _)) = strides, pads
    hp, wp = in_hw[0] + sum(pads[0]), in_hw[1] + sum(pads[1])
    dcols = lax.dot_general(
        g.reshape(-1, o).astype(jnp.float32),
        kernel.reshape(kh * kw * c, o).astype(jnp.float32),
        (((1,), (1,)), ((), ())),
        precision=lax.Precision.HIGHEST,
    ).reshape(n, ho, wo, kh, kw, c)
    zero = jnp.zeros((), jnp.float32)
    dxp = None
    for i in range(kh):
        for j in range(kw):
            hi_h = hp - (i + (ho - 1) * sh + 1)
            hi_w = wp - (j + (wo - 1) * sw + 1)
            part = lax.pad(dcols[:, :, :, i, j, :], zero, ((0, 0, 0), (i, hi_h, sh - 1), (j, hi_w, sw - 1), (0, 0, 0)))
            dxp = part if dxp is None else dxp + part
    return dxp[:, ph : ph + in_hw[0], pw : pw + in_hw[1], :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _xnor_conv(x, kernel, strides, pads, pad_value):
    return _xnor_conv_fwd(x, kernel, strides, pads, pad_value)[0]


def _xnor_conv_fwd(x, kernel, strides, pads, pad_value):
    c = x.shape[-1]
    x_bits = pack_bits(x, axis=-1)
    acc = packed_conv(x_bits, pack_bits(kernel, axis=2), c, strides, pads, pad_value, method="xor_popcount")
    y = (acc.astype(jnp.float32) * _channel_scale(kernel)).astype(jnp.result_type(x.dtype, kernel.dtype))
    # The input is kept as its bits; an empty array carries its dtype to the backward.
    return y, (x_bits, jnp.zeros((0,), x.dtype), kernel)


def _xnor_conv_bwd(strides, pads, pad_value, res, g):
    x_bits, x_dtype_carrier, kernel = res
    n, h, w, _ = x_bits.shape
    c, o = kernel.shape[2], kernel.shape[3]
    window = kernel.shape[:2]
    x_aval = jax.ShapeDtypeStruct((n, h, w, c), x_dtype_carrier.dtype)
    if strides == (1, 1):
        # ∂x of a stride-1 convolution is a stride-1 convolution with the flipped kernel
        # (a constant pad value has no cotangent); XLA:CPU runs it as fast as the GEMM, and
        # alongside ∂k (col2im over chunks of images measured faster per layer but slower
        # in the whole step, docs/performance.md).
        (dx,) = jax.linear_transpose(
            lambda v: lax.conv_general_dilated(v, kernel.astype(v.dtype), strides, pads, dimension_numbers=_DN), x_aval
        )(g.astype(x_aval.dtype))
    else:
        # A strided one would be an input-dilated convolution (3/4 zeros at stride 2).
        dx = _col2im_grad(g, kernel, strides, pads, (h, w)).astype(x_aval.dtype)
    # ∂k = im2col(x)ᵀ·g, written as (gᵀ·im2col(x))ᵀ: XLA:CPU's GEMM is faster with the
    # small (N·Ho·Wo, O) operand first. The ±1 patches are rebuilt from the bits.
    out_hw = g.shape[1:3]
    if pad_value in (-1.0, 1.0):
        # Gather the patches as packed words (32× fewer bytes); they are unpacked chunk by
        # chunk inside the GEMM's loop.
        fill = jnp.uint32(0xFFFFFFFF if pad_value > 0 else 0)
        words = jnp.pad(x_bits, ((0, 0), *pads, (0, 0)), constant_values=fill)
        taps = window[0] * window[1]
        patches = geometry.im2col(words, window, strides, out_hw).reshape(n, -1, taps, x_bits.shape[-1])
        dk_t = _packed_patches_gemm(g.reshape(n, -1, o).astype(jnp.float32), patches, c)
    else:
        x_pm = unpack_bits(x_bits, c, axis=-1, dtype=jnp.float32)
        x_pm = jnp.pad(x_pm, ((0, 0), *pads, (0, 0)), constant_values=jnp.float32(pad_value))
        cols = geometry.im2col(x_pm, window, strides, out_hw)
        dk_t = lax.dot_general(
            g.reshape(-1, o).astype(jnp.float32),
            cols,
            (((0,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
    dk = dk_t.T.reshape(*window, c, o).astype(kernel.dtype)
    return dx, dk


# Floats of unpacked patches (rows × taps·C) per chunk of the weight-gradient GEMM: a
# chunk written by the unpacking is read by the GEMM from cache, not memory. 10 MiB: 2
# images at 32×32×128, 4 at 16×16×256, 8 at 8×8×512 (VGG-small; docs/performance.md).
_CHUNK_FLOATS = 10 * 2**20 // 4


def _images_per_chunk(n: int, floats_per_image: int) -> int:
    """The largest divisor of ``n`` whose images fit in one chunk (at least 1)."""
    most = max(1, _CHUNK_FLOATS // floats_per_image)
    return max(k for k in range(1, min(n, most) + 1) if n % k == 0)


def _packed_patches_gemm(g: Array, patches: Array, c: int) -> Array:
    """``gᵀ·unpack(patches)``, ``(O, taps·C)``, summed over chunks of whole images.

    ``g`` is ``(N, P, O)`` and ``patches`` ``(N, P, taps, words)``: P output positions per
    image. Unpacking all patches first writes ``N·P·taps·C`` floats to memory and reads
    them back (604 MB for VGG-small's conv1 at batch 128): as long as the GEMM itself.
    Chunk by chunk, the unpacked floats stay in cache: −36 % CPU time for conv1's ∂k
    (docs/performance.md). The sum over chunks reorders float32 additions only.
    """
    n, p, o = g.shape
    k = _images_per_chunk(n, p * patches.shape[2] * c)
    g_chunks = g.reshape(n // k, k * p, o)
    p_chunks = patches.reshape(n // k, k * p, *patches.shape[2:])

    def add_chunk(acc, chunk):
        g_c, words_c = chunk
        cols = unpack_bits(words_c, c, axis=-1, dtype=jnp.float32).reshape(k * p, -1)
        return acc + lax.dot_general(g_c, cols, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST), None

    acc = jnp.zeros((o, patches.shape[2] * c), jnp.float32)
    return lax.scan(add_chunk, acc, (g_chunks, p_chunks))[0]


_xnor_conv.defvjp(_xnor_conv_fwd, _xnor_conv_bwd)


def binary_conv2d(
    x: Array,
    kernel: Array,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    pad_value: float = 1.0,
    *,
    impl: str = "auto",
) -> Array:
    """2-D convolution of a ±1 input with a ±α kernel, NHWC / HWIO.

    Computes ``lax.conv_general_dilated(pad(x, pad_value), kernel, strides, VALID)``
    (padded pixels take ``pad_value``, as Larq's ``pad_values``), differentiable in ``x``
    and ``kernel`` with the plain convolution's gradients.

    Contract (not checked, it would cost a pass over the data): every ``x`` is ``−1`` or
    ``+1`` and every ``kernel[..., o]`` is ``−α_o`` or ``+α_o``. The ``"xnor"`` forward
    reads only the signs (``v >= 0``) and ``α_o = max|kernel[..., o]|``; values outside
    the contract give a different result than ``"xla"``.

    Args:
      x: ``(N, H, W, C)`` ±1 values (any float dtype).
      kernel: ``(kh, kw, C, O)``.
      strides: an int or ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      pad_value: the value of padded pixels (static). ``"xnor"`` takes −1, 0 or +1;
        under ``"auto"`` any other value falls back to ``"xla"``.
      impl: ``"auto"`` (:func:`default_impl` of the platform the step is lowered for,
        not the host's: ``jax.export`` for ``("cuda",)`` on a CPU gets ``"xla"``),
        ``"xnor"`` or ``"xla"``.

    Returns:
      ``(N, Ho, Wo, O)`` in the promoted dtype of ``x`` and ``kernel``.
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"binary_conv2d takes x (N, H, W, C) and kernel (kh, kw, C, O); got shapes "
            f"{tuple(x.shape)} and {tuple(kernel.shape)}."
        )
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"x has {x.shape[3]} channels but the kernel expects {kernel.shape[2]}.")
    strides = geometry.ntuple(strides, 2, "strides")
    window = tuple(kernel.shape[:2])
    pads = geometry.padding_pairs(padding, x.shape[1:3], window, strides, nonnegative=True)
    if not isinstance(pad_value, numbers.Real) or not math.isfinite(pad_value):
        raise ValueError(f"pad_value must be a finite Python number; got {pad_value!r}.")
    pad_value = float(pad_value)
    geometry.output_size(x.shape[1:3], window, strides, pads)  # raises when the window does not fit
    impl = _check_impl(impl)
    if pad_value not in _PACKED_PAD_VALUES:
        if impl == "xnor":
            raise ValueError(f"impl='xnor' pads with -1, 0 or +1; got pad_value={pad_value!r}.")
        impl = "xla"
    fns = {
        "xla": lambda x, k: _xla_conv(x, k, strides, pads, pad_value),
        "xnor": lambda x, k: _xnor_conv(x, k, strides, pads, pad_value),
    }
    return _by_platform(fns, x, kernel) if impl == "auto" else fns[impl](x, kernel)


# --------------------------------------------------------------------------- dense


@jax.custom_vjp
def _xnor_dense(x, kernel):
    return _xnor_dense_fwd(x, kernel)[0]


def _xnor_dense_fwd(x, kernel):
    k = x.shape[-1]
    x_bits = pack_bits(x, axis=-1)
    acc = packed_dense(x_bits, pack_bits(kernel, axis=0), k, method="xor_popcount")
    y = (acc.astype(jnp.float32) * _channel_scale(kernel)).astype(jnp.result_type(x.dtype, kernel.dtype))
    return y, (x_bits, jnp.zeros((0,), x.dtype), kernel)


def _xnor_dense_bwd(res, g):
    x_bits, x_dtype_carrier, kernel = res
    k, n = kernel.shape
    g2 = g.reshape(-1, n).astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    dx = lax.dot_general(g2, kernel.astype(jnp.float32), (((1,), (1,)), ((), ())), precision=hi)
    x_pm = unpack_bits(x_bits.reshape(-1, x_bits.shape[-1]), k, axis=-1, dtype=jnp.float32)
    # As in the convolution: (gᵀ·x)ᵀ puts the small operand first for XLA:CPU's GEMM.
    dk = lax.dot_general(g2, x_pm, (((0,), (0,)), ((), ())), precision=hi).T
    return dx.reshape(*x_bits.shape[:-1], k).astype(x_dtype_carrier.dtype), dk.astype(kernel.dtype)


_xnor_dense.defvjp(_xnor_dense_fwd, _xnor_dense_bwd)


def binary_dense(x: Array, kernel: Array, *, impl: str = "auto") -> Array:
    """``x @ kernel`` for ±1 ``x (..., K)`` and a ±α ``kernel (K, N)`` (α per column).

    Same contract and ``impl`` choices as :func:`binary_conv2d`; the ``"xnor"`` forward is
    ``α ⊙ (K − 2·popcount(x XOR sign k))``, the backward ``∂x = g·kᵀ``, ``∂k = xᵀ·g``.
    """
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"binary_dense takes x (..., K) and kernel (K, N); got shapes {tuple(x.shape)} and {tuple(kernel.shape)}."
        )
    fns = {
        "xla": lambda x, k: lax.dot_general(x, k.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ()))),
        "xnor": _xnor_dense,
    }
    impl = _check_impl(impl)
    return _by_platform(fns, x, kernel) if impl == "auto" else fns[impl](x, kernel)
