"""Bit-packed export and inference: packing, XNOR-popcount kernels, the packed model file.

* ``packing``: ``pack_bits`` / ``unpack_bits`` (32 signs per uint32 word, LSB first,
  padded with ``PAD_BIT = 0``) and ``packed_size_bytes``.
* ``kernels``: ``packed_dense`` and ``packed_conv`` (``K − 2·popcount(a XOR w)``, exact
  int32), ``threshold_to_bits`` and ``bn_sign_thresholds`` (BatchNorm + sign as an integer
  compare that emits the next layer's packed bits).
* ``model``: ``export(name, config, variables, input_shape)`` -> :class:`PackedModel`
  (``model(images) -> logits``, ``.report()``, ``.save(path)``) and ``load(path)``: every
  registry model, packed weights in one ``.npz`` file, packed inference (``chain`` /
  ``generic`` runtimes).
"""

from binax.export.kernels import (
    CPU_COMPILER_OPTIONS,
    METHODS,
    bn_sign_thresholds,
    default_method,
    packed_conv,
    packed_dense,
    threshold_to_bits,
)
from binax.export.model import FORMAT_VERSION, PackedModel, export, inference_config, load, save
from binax.export.packing import PAD_BIT, WORD_BITS, num_words, pack_bits, packed_size_bytes, unpack_bits

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "FORMAT_VERSION",
    "METHODS",
    "PAD_BIT",
    "WORD_BITS",
    "bn_sign_thresholds",
    "default_method",
    "export",
    "inference_config",
    "load",
    "num_words",
    "pack_bits",
    "packed_conv",
    "packed_dense",
    "packed_size_bytes",
    "PackedModel",
    "save",
    "threshold_to_bits",
    "unpack_bits",
]
