"""Fast paths for the training step of binary layers (``binary_conv2d``, ``binary_dense``).

A binary layer multiplies an input ``x ∈ {−1, +1}`` by a kernel ``k = α ⊙ sign(w)``, with
``α ≥ 0`` one scale per output channel (1 for BNN's ``ste_sign``, ``mean|w|`` for XNOR-Net,
a power of two for IR-Net's Libra-PB). The scale factors out of the product,
``conv(x, α·sign w) = α · conv(x, sign w)``, leaving an integer product of ±1 values that
is computed EXACTLY as ``K − 2·popcount(x XOR w)`` on bit-packed operands
(:mod:`binax.packed`). The backward is the plain product's:

* ``∂x = g ⋆ k`` (the transposed convolution / ``g·kᵀ``) and
* ``∂k = im2col(x)ᵀ · g`` (``xᵀ·g``), a float32 GEMM whose ±1 operand is rebuilt from
  the packed bits the forward keeps (32× less activation memory than float32).

``g`` is a float, so both backward products stay float32: no low-precision format that
this library can reach holds ``g`` exactly, and the results must match the plain
formulation within float32 tolerance (``tests/test_ops.py``).

Implementations (``impl=``): ``"xnor"`` (the above, as a ``jax.custom_vjp``), ``"xla"``
(the plain ``lax.conv_general_dilated`` / ``lax.dot_general`` formulation, differentiated
by JAX), ``"auto"``: ``"xnor"`` on CPU, where XLA's convolutions are slow and the popcount
loop vectorises (AVX-512 VPOPCNTDQ), ``"xla"`` on GPU/TPU, whose native convolutions and
matrix units serve the plain form (reasoned, not measured here). ``"auto"`` is decided
for the platform the step is LOWERED for (``lax.platform_dependent``), not the host's
default backend, so ``jax.export(..., platforms=("cuda",))`` on a CPU host gets the GPU
formulation (``tests/test_lowering.py``). ``docs/performance.md`` has the measurements.

Which quantizers qualify: :func:`fast_path_supported` (input quantizers whose descriptor
declares ``forward="sign"``, exactly ``±1``; kernel quantizers with ``"sign"`` or
``"scaled_sign"``, ``±α`` per output channel: see ``binax.binarizers.register``).

:func:`max_pool` is ``nn.max_pool`` with an elementwise backward for non-overlapping
windows (the 2×2 pools of VGG-style binary networks), the same values and gradients.
"""

from binax.ops.binary import (
    IMPLS,
    binary_conv2d,
    binary_dense,
    default_impl,
    fast_path_supported,
)
from binax.ops.pool import max_pool

__all__ = [
    "IMPLS",
    "binary_conv2d",
    "binary_dense",
    "default_impl",
    "fast_path_supported",
    "max_pool",
]
