"""Bit-packed export and inference: the packed model file and its runtimes.

* ``model``: ``export(model, variables, preprocessing=...)`` -> :class:`PackedModel`
  (``packed(raw_images) -> logits``, ``.forward(inputs)``, ``.report()``,
  ``.save(path)``, ``.save_portable(path)``) and ``load(path)``: every registry model,
  packed weights in one ``.npz`` file (format: docs/export.md), packed inference
  (``chain`` / ``generic`` runtimes), and a ``jax.export`` artifact that runs without
  binax. ``load`` reads a file as data (:mod:`binax.export.packed_file`).
* ``preprocessing``: :class:`Preprocessing`, what the training pipeline did to raw images.
* ``runtime``: :class:`PackedModel` at run time (``report``: what runs packed, layer by layer).
* ``inference``: a quantized layer in inference form (``codes``: activation codes; packed
  kernels), read from the layer's descriptor (:mod:`binax.layers.descriptor`);
  ``packed_layer``: its packed compute.
* ``chain``: sequential models whose binary layers pass packed bits to each other
  (``thresholds``: the integer thresholds between them).
* ``lce``: a packed chain as a Larq Compute Engine ``.tflite`` (``export_tflite``;
  TensorFlow runs in a subprocess, ``pip install 'binax[lce]'``; not imported here).

The packing and the XNOR-popcount kernels they run on are :mod:`binax.packed`, shared
with the training fast path (:mod:`binax.ops`). From a training run's workdir::

    model, variables, config, step = binax.train.restore_variables("runs/vgg")
    packed = binax.export.export(model, variables, preprocessing=Preprocessing.from_config(config))
"""

from binax.export.model import (
    FORMAT_VERSION,
    PORTABLE_REQUIREMENTS,
    PackedModel,
    export,
    load,
    read_meta,
    save,
)
from binax.export.preprocessing import Preprocessing

__all__ = [
    "FORMAT_VERSION",
    "PORTABLE_REQUIREMENTS",
    "export",
    "load",
    "PackedModel",
    "Preprocessing",
    "read_meta",
    "save",
]
