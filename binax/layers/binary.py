"""Binary dense and convolution layers (input and kernel quantizers), and their descriptors."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from jax import lax

from binax import binarizers, ops
from binax.layers.descriptor import Geometry, LayerDescriptor, register
from binax.packed import geometry

Array = jax.Array
Spec = Any  # str | Callable | None: a binarizer registry name, a callable, or no quantization.

__all__ = ["default_pad_value", "BinaryDense", "BinaryConv", "BinaryDepthwiseConv"]


def _resolve(spec: Spec, kwargs: Mapping[str, Any] | None):
    return binarizers.resolve(spec, **dict(kwargs or {}))


def _quantize(spec: Spec, kwargs, x: Array, progress) -> Array:
    fn = _resolve(spec, kwargs)
    return x if fn is None else fn(x, progress)


def default_pad_value(pad_values: float | None, input_quantizer: Spec) -> float:
    """The value a convolution pads its (quantized) input with.

    Zero is not a binary value, so a layer whose input is binarized pads with
    **+1** by default: the value every sign-like binarizer gives to 0 (binax keeps
    ``sign(0) = +1``), and a member of every value set binax binarizers produce
    ({-1, +1}, {0, 1}, {0, 1/2, 1}). Without an input quantizer the default is 0, an
    ordinary zero-padded convolution. An explicit ``pad_values`` always wins.
    """
    if pad_values is not None:
        return float(pad_values)
    return 1.0 if input_quantizer is not None else 0.0


# --------------------------------------------------------------------- convolution


def _check_conv_input(x: Array, nd: int, layer: str) -> None:
    if x.ndim != nd + 2:
        raise ValueError(
            f"{layer} with a {nd}-d kernel expects input of rank {nd + 2} "
            f"(batch, {nd} spatial axes, channels); got shape {tuple(x.shape)}."
        )


_glorot = nn.initializers.glorot_uniform()


class _ConvGeometry:
    """Window and pad value of a convolution layer (needs ``kernel_size``, ``pad_values``,
    ``input_quantizer``); an int ``kernel_size`` means a square 2-D window."""

    @property
    def window(self) -> tuple[int, ...]:
        if isinstance(self.kernel_size, int):
            return (self.kernel_size,) * 2
        return tuple(self.kernel_size)

    @property
    def pad_value(self) -> float:
        return default_pad_value(self.pad_values, self.input_quantizer)


class BinaryDense(nn.Module):
    """Dense layer with optional input and kernel binarizers (BNN, XNOR-Net, IR-Net, ...).

    ``y = q_in(x) @ q_w(W) (+ b)``; ``W`` is ``latent_kernel`` when ``kernel_quantizer`` is
    set, else ``kernel``. The layer never clips its latent weights; the trainer does
    (``clip_latent_weights``).
    """

    features: int
    use_bias: bool = False
    input_quantizer: Spec = None
    input_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_quantizer: Spec = None
    kernel_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_init: Callable = _glorot
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        x = _quantize(self.input_quantizer, self.input_quantizer_kwargs, x, progress)
        name = "latent_kernel" if self.kernel_quantizer is not None else "kernel"
        kernel = self.param(name, self.kernel_init, (x.shape[-1], self.features))
        kernel = _quantize(self.kernel_quantizer, self.kernel_quantizer_kwargs, kernel, progress)
        if ops.fast_path_supported(self.input_quantizer, self.kernel_quantizer):
            y = ops.binary_dense(x, kernel)  # ±1 input, ±α kernel: see binax.ops
        else:
            y = lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
        return y


class BinaryConv(_ConvGeometry, nn.Module):
    """1-d / 2-d / 3-d convolution with optional input and kernel binarizers.

    The input is quantized FIRST, then padded explicitly with ``pad_values`` (default
    +1 when the input is quantized, see :func:`default_pad_value`), then convolved with
    VALID padding; so a binary input stays binary at the borders. ``kernel_size`` gives
    the number of spatial axes (an int means 2-d). ``feature_group_count`` > 1 gives a
    grouped convolution.
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[Any] = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = False
    pad_values: float | None = None
    input_quantizer: Spec = None
    input_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_quantizer: Spec = None
    kernel_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_init: Callable = _glorot
    bias_init: Callable = nn.initializers.zeros

    def _kernel_shape(self, in_features: int) -> tuple[int, ...]:
        if in_features % self.feature_group_count:
            raise ValueError(
                f"input channels ({in_features}) must be divisible by feature_group_count "
                f"({self.feature_group_count})."
            )
        return self.window + (in_features // self.feature_group_count, self.features)

    def _fast_path(self, nd: int, dilation) -> bool:
        # A ±1 input times a ±α kernel: binax.ops computes the same convolution (exact
        # XNOR-popcount forward, same gradients) faster where the backend favours it.
        return (
            nd == 2
            and self.feature_group_count == 1
            and all(d == 1 for d in dilation)
            and ops.fast_path_supported(self.input_quantizer, self.kernel_quantizer)
        )

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        nd = len(self.window)
        _check_conv_input(x, nd, type(self).__name__)
        strides = geometry.ntuple(self.strides, nd, "strides")
        dilation = geometry.ntuple(self.kernel_dilation, nd, "kernel_dilation")
        x = _quantize(self.input_quantizer, self.input_quantizer_kwargs, x, progress)
        name = "latent_kernel" if self.kernel_quantizer is not None else "kernel"
        kernel = self.param(name, self.kernel_init, self._kernel_shape(x.shape[-1]))
        kernel = _quantize(self.kernel_quantizer, self.kernel_quantizer_kwargs, kernel, progress)
        if self._fast_path(nd, dilation):
            pads = geometry.padding_pairs(self.padding, x.shape[1:-1], self.window, strides, dilation)
            y = ops.binary_conv2d(x, kernel, strides, pads, self.pad_value)
        else:
            y = geometry.padded_conv(x, kernel, strides, self.padding, dilation, self.feature_group_count, self.pad_value)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
        return y


class BinaryDepthwiseConv(_ConvGeometry, nn.Module):
    """Depthwise convolution (one filter per input channel, ``depth_multiplier`` outputs each).

    Kernel shape ``(*window, 1, C * depth_multiplier)``; per-output-channel weight
    binarizers therefore scale each depthwise filter separately. Padding as
    :class:`BinaryConv`.
    """

    kernel_size: int | Sequence[int] = (3, 3)
    depth_multiplier: int = 1
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[Any] = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = False
    pad_values: float | None = None
    input_quantizer: Spec = None
    input_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_quantizer: Spec = None
    kernel_quantizer_kwargs: Mapping[str, Any] | None = None
    kernel_init: Callable = _glorot
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        nd = len(self.window)
        _check_conv_input(x, nd, type(self).__name__)
        channels = x.shape[-1]
        features = channels * self.depth_multiplier
        x = _quantize(self.input_quantizer, self.input_quantizer_kwargs, x, progress)
        name = "latent_kernel" if self.kernel_quantizer is not None else "kernel"
        kernel = self.param(name, self.kernel_init, self.window + (1, features))
        kernel = _quantize(self.kernel_quantizer, self.kernel_quantizer_kwargs, kernel, progress)
        y = geometry.padded_conv(
            x,
            kernel,
            geometry.ntuple(self.strides, nd, "strides"),
            self.padding,
            geometry.ntuple(self.kernel_dilation, nd, "kernel_dilation"),
            channels,
            self.pad_value,
        )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (features,)).astype(y.dtype)
        return y


# ------------------------------------------------------------------ descriptors


def _input(module) -> tuple[Spec, dict]:
    return module.input_quantizer, dict(module.input_quantizer_kwargs or {})


def _kernel(module) -> tuple[Spec, dict]:
    return module.kernel_quantizer, dict(module.kernel_quantizer_kwargs or {})


def _conv_geometry(module) -> Geometry:
    groups = getattr(module, "feature_group_count", 1)
    return Geometry(module.window, module.strides, module.padding, module.kernel_dilation, groups, module.pad_value)


register(BinaryDense, LayerDescriptor(product="dense", input_quantizer=_input, kernel_quantizer=_kernel, export="binary"))
register(
    BinaryConv,
    LayerDescriptor(product="conv", input_quantizer=_input, kernel_quantizer=_kernel, geometry=_conv_geometry, export="binary"),
)
register(
    BinaryDepthwiseConv,
    LayerDescriptor(
        product="depthwise_conv", input_quantizer=_input, kernel_quantizer=_kernel, geometry=_conv_geometry, export="binary"
    ),
)
