"""Bit-packed arithmetic: the low-level layer under training (``binax.ops``) and export.

* :mod:`~binax.packed.bits`: ``pack_bits`` / ``unpack_bits`` (32 signs per uint32 word,
  LSB first, padded with ``PAD_BIT = 0``), their NumPy forms ``pack_bits_np`` and
  ``column_sums``, and ``packed_size_bytes``.
* :mod:`~binax.packed.kernels`: ``packed_dense`` and ``packed_conv``
  (``K − 2·popcount(a XOR w)``, exact int32) and ``threshold_to_bits`` (an integer
  compare per channel that emits the next layer's packed bits).
* :mod:`~binax.packed.geometry`: convolution geometry shared by the layers, the training
  fast path and the packed kernels: ``ntuple``, ``padding_pairs``, ``output_size``,
  ``im2col``, ``conv``, ``padded_conv``.

Nothing here imports another binax module but ``binax._checks``: ``binax.layers``,
``binax.ops`` and ``binax.export`` all build on it.
"""

from binax.packed import geometry
from binax.packed.bits import (
    PAD_BIT,
    WORD_BITS,
    column_sums,
    num_words,
    pack_bits,
    pack_bits_np,
    packed_size_bytes,
    unpack_bits,
)
from binax.packed.kernels import (
    CPU_COMPILER_OPTIONS,
    METHODS,
    default_method,
    packed_conv,
    packed_dense,
    threshold_to_bits,
)

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "METHODS",
    "PAD_BIT",
    "WORD_BITS",
    "column_sums",
    "default_method",
    "geometry",
    "num_words",
    "pack_bits",
    "pack_bits_np",
    "packed_conv",
    "packed_dense",
    "packed_size_bytes",
    "threshold_to_bits",
    "unpack_bits",
]
