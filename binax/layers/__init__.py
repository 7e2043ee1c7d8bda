"""Binary layers: Flax Linen modules used functionally (see docs/design.md), each with
its descriptor (:mod:`binax.layers.descriptor`).

Every quantized layer takes an activation (input) binarizer and a weight binarizer by
registry name or callable (``input_quantizer``, ``input_quantizer_kwargs``,
``kernel_quantizer``, ``kernel_quantizer_kwargs``), reached ONLY through
``binax.binarizers.resolve``, and a ``progress`` value at call time, so every schedule
(EDE ``t``/``k``, tanh ``nu``) follows one traced scalar and never recompiles.

Naming contract: a layer whose kernel is quantized stores its real-valued ("latent")
weight as the parameter ``latent_kernel``; an unquantized kernel is named ``kernel``,
as Flax does. Kernels keep the output channel last (Dense ``(in, out)``, Conv
``(*window, in / groups, out)``).

What the summary and the exporter know of a layer type is its :class:`LayerDescriptor`,
registered beside the class (``register(cls, LayerDescriptor(...))``) and read with
:func:`describe`; none of them tests a layer's class.

* ``binary``: ``BinaryDense``, ``BinaryConv`` (1-, 2-, 3-d, grouped), ``BinaryDepthwiseConv``;
* ``abc_net``: ``ABCDense``, ``ABCConv``;
* ``elementwise``: ``BinaryBatchNorm``, ``LearnableShift``, ``RSign``, ``RPReLU``;
* ``latent``: ``clip_latent_weights``, ``latent_kernel_mask``, ``is_latent_kernel_path``.
"""

from binax.layers.abc_net import ABCConv, ABCDense
from binax.layers.binary import BinaryConv, BinaryDense, BinaryDepthwiseConv, default_pad_value
from binax.layers.descriptor import Geometry, LayerDescriptor, Operand, describe, register
from binax.layers.elementwise import BinaryBatchNorm, LearnableShift, RPReLU, RSign
from binax.layers.latent import clip_latent_weights, is_latent_kernel_path, latent_kernel_mask

__all__ = [
    "default_pad_value",
    "BinaryDense",
    "BinaryConv",
    "BinaryDepthwiseConv",
    "ABCDense",
    "ABCConv",
    "BinaryBatchNorm",
    "LearnableShift",
    "RSign",
    "RPReLU",
    "clip_latent_weights",
    "latent_kernel_mask",
    "is_latent_kernel_path",
    "LayerDescriptor",
    "Geometry",
    "Operand",
    "register",
    "describe",
]
