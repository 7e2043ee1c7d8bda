"""Bit-packed export and inference: the packed model file and its runtimes.

* ``model``: ``export(name, config, variables, input_shape)`` -> :class:`PackedModel`
  (``model(images) -> logits``, ``.report()``, ``.save(path)``) and ``load(path)``: every
  registry model, packed weights in one ``.npz`` file, packed inference (``chain`` /
  ``generic`` runtimes).
* ``inference``: a quantized layer in inference form (activation codes, packed kernels).
* ``chain``: sequential models whose binary layers pass packed bits to each other.

The packing and the XNOR-popcount kernels they run on are :mod:`binax.packed`, shared
with the training fast path (:mod:`binax.ops`).
"""

from binax.export.model import FORMAT_VERSION, PackedModel, export, inference_config, load, save

__all__ = [
    "FORMAT_VERSION",
    "export",
    "inference_config",
    "load",
    "PackedModel",
    "save",
]
