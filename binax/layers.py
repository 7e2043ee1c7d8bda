"""Binary layers: Flax Linen modules used functionally (see docs/design.md).

Every quantized layer takes an activation (input) binarizer and a weight binarizer by
registry name or callable (``input_quantizer``, ``input_quantizer_kwargs``,
``kernel_quantizer``, ``kernel_quantizer_kwargs``), reached ONLY through
``binax.binarizers.resolve``, and a ``progress`` value at call time, so every schedule
(EDE ``t``/``k``, tanh ``nu``) follows one traced scalar and never recompiles.

Naming contract: a layer whose kernel is quantized stores its real-valued ("latent")
weight as the parameter ``latent_kernel``; an unquantized kernel is named ``kernel``,
as Flax does. Kernels keep the output channel last (Dense ``(in, out)``, Conv
``(*window, in / groups, out)``).

Latent-weight clipping (BNN's ``weight_clip``, Larq's ``kernel_constraint``) is a
property of training, not of the forward pass: a model names its clip value
(``latent_weight_clip``) and the trainer calls :func:`clip_latent_weights` on the
parameter tree after each update; layers know nothing of it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from binax import binarizers, ops
from binax.packed import geometry

Array = jax.Array
Spec = Any  # str | Callable | None: a binarizer registry name, a callable, or no quantization.

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
]


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


# -------------------------------------------------------------------------- ABC-Net


def _abc_shift_init(n: int):
    """Initial shifts v_n: thresholds 0.5 − v_n spread evenly over [−1, 1] (0 for N = 1).

    ``H_v(x) = sign(x + v − 0.5)`` (0 -> +1), so v = 0.5 is a plain sign; after BN the
    spread thresholds cover the bulk of the unit-variance input.
    """

    def init(key, shape, dtype=jnp.float32):
        del key
        u = jnp.linspace(-1.0, 1.0, n) if n > 1 else jnp.zeros((1,))
        return (0.5 - u).astype(dtype).reshape(shape)

    return init


def _abc_beta_init(n: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, 1.0 / n, dtype)

    return init


def _check_bases(m: int, n: int, layer: str) -> None:
    for name, v in (("m", m), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{layer}.{name} (number of ABC-Net bases) must be an integer >= 1; got {v!r}.")


class ABCDense(nn.Module):
    """ABC-Net dense layer (Lin et al. NIPS 2017): M weight bases × N activation bases.

    ``y = Σ_m Σ_n α_m β_n (H_{v_n}(x) @ B_m)``, computed as ONE product
    ``(Σ_n β_n H_{v_n}(x)) @ (Σ_m α_m B_m)``: the product is bilinear, so the combined
    operands give exactly the double sum (up to float summation order). The activation
    shifts ``shifts`` (v_n) and scales ``betas`` (β_n) are learned; α and B_m come from
    ``binarizers.abc_weight`` (least squares on the current latent weights).
    """

    features: int
    m: int = 3
    n: int = 3
    use_bias: bool = False
    kernel_init: Callable = _glorot
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        del progress  # ABC-Net has no schedule
        _check_bases(self.m, self.n, "ABCDense")
        shifts = self.param("shifts", _abc_shift_init(self.n), (self.n,))
        betas = self.param("betas", _abc_beta_init(self.n), (self.n,))
        a = binarizers.abc_activation(x, shifts, betas)
        latent = self.param("latent_kernel", self.kernel_init, (x.shape[-1], self.features))
        w = binarizers.abc_weight(latent, self.m)
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        return self.combine(a, w, betas, bias)

    def combine(self, a: Array, w: Array, betas: Array, bias: Array | None = None) -> Array:
        """``a @ w (+ bias)`` for the combined activation and kernel (see :class:`ABCConv`)."""
        del betas  # a dense layer has no padding
        y = lax.dot_general(a, w.astype(a.dtype), (((a.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias.astype(y.dtype)


class ABCConv(_ConvGeometry, nn.Module):
    """ABC-Net convolution: ``Σ_m Σ_n α_m β_n conv(B_m, H_{v_n}(x))`` as one convolution.

    By bilinearity ``conv(Σ_m α_m B_m, Σ_n β_n H_n) = Σ_m Σ_n α_m β_n conv(B_m, H_n)``;
    padding every binary activation H_n with ``p`` (default +1) is padding the combined
    activation with ``p·Σ_n β_n``, which this layer does, so borders match the M×N
    binary convolutions too.
    """

    features: int
    kernel_size: int | Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[Any] = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    m: int = 3
    n: int = 3
    pad_values: float | None = None
    use_bias: bool = False
    kernel_init: Callable = _glorot
    bias_init: Callable = nn.initializers.zeros

    @property
    def pad_value(self) -> float:
        # Every H_n is a binary (+-1) activation: pad each with +1 unless told otherwise.
        return 1.0 if self.pad_values is None else float(self.pad_values)

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        del progress
        _check_bases(self.m, self.n, "ABCConv")
        nd = len(self.window)
        _check_conv_input(x, nd, "ABCConv")
        shifts = self.param("shifts", _abc_shift_init(self.n), (self.n,))
        betas = self.param("betas", _abc_beta_init(self.n), (self.n,))
        a = binarizers.abc_activation(x, shifts, betas)
        latent = self.param("latent_kernel", self.kernel_init, self.window + (x.shape[-1], self.features))
        w = binarizers.abc_weight(latent, self.m)
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        return self.combine(a, w, betas, bias)

    def combine(self, a: Array, w: Array, betas: Array, bias: Array | None = None) -> Array:
        """The layer's product of the combined activation ``a`` and kernel ``w = Σ α_m B_m``
        (also the packed model's float form of an ABC convolution)."""
        nd = len(self.window)
        y = geometry.padded_conv(
            a,
            w,
            geometry.ntuple(self.strides, nd, "strides"),
            self.padding,
            geometry.ntuple(self.kernel_dilation, nd, "kernel_dilation"),
            1,
            self.pad_value * jnp.sum(betas) if self.pad_value != 0 else 0.0,
        )
        return y if bias is None else y + bias.astype(y.dtype)


# ------------------------------------------------------------ BinaryBN and ReActNet


class BinaryBatchNorm(nn.Module):
    """Batch norm followed by sign, folded into a per-channel threshold compare.

    Self-Binarizing Networks (Lahoud & Achanta 2019): ``sign(BN(x)) = s · sign(x − τ)``
    per channel. Parameters ``threshold`` (τ) and ``sign`` (s ∈ {−1, +1}) come from
    ``binax.transforms.fold_bn_sign``; the output is ``s`` where ``x >= τ`` and ``−s``
    elsewhere, in {−1, +1}. Inference only: it has no statistics and no useful gradient.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        threshold = self.param("threshold", nn.initializers.zeros, (c,))
        s = self.param("sign", nn.initializers.ones, (c,))
        return jnp.where(x >= threshold.astype(x.dtype), s, -s).astype(x.dtype)


class LearnableShift(nn.Module):
    """A learned per-channel shift ``x + b`` (parameter ``shift``, initialised to 0)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b = self.param("shift", nn.initializers.zeros, (x.shape[-1],))
        return x + b.astype(x.dtype)


class RSign(nn.Module):
    """ReActNet RSign (Liu et al. ECCV 2020): ``q(x + b)`` with a learned per-channel shift.

    ``b`` (parameter ``shift``) moves each channel's sign threshold; ``q`` defaults to
    ``approx_sign`` (forward sign, backward ``max(0, 2 − 2|x|)``).
    """

    binarizer: Spec = "approx_sign"
    binarizer_kwargs: Mapping[str, Any] | None = None

    @nn.compact
    def __call__(self, x: Array, progress: float | Array = 1.0) -> Array:
        b = self.param("shift", nn.initializers.zeros, (x.shape[-1],))
        return _quantize(self.binarizer, self.binarizer_kwargs, x + b.astype(x.dtype), progress)


class RPReLU(nn.Module):
    """ReActNet RPReLU: shift → per-channel PReLU → shift.

    ``z = x + γ``; ``y = (z if z > 0 else β·z) + ζ``; parameters ``shift_in`` (γ, 0),
    ``slope`` (β, ``slope_init``) and ``shift_out`` (ζ, 0), one per channel.
    """

    slope_init: float = 0.25

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        shift_in = self.param("shift_in", nn.initializers.zeros, (c,)).astype(x.dtype)
        slope = self.param("slope", nn.initializers.constant(self.slope_init), (c,)).astype(x.dtype)
        shift_out = self.param("shift_out", nn.initializers.zeros, (c,)).astype(x.dtype)
        z = x + shift_in
        return jnp.where(z > 0, z, slope * z) + shift_out


# ------------------------------------------------------------- latent-weight helpers


def _key_name(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def is_latent_kernel_path(path) -> bool:
    """Whether a ``jax.tree_util`` key path ends at a ``latent_kernel`` leaf."""
    return bool(path) and _key_name(path[-1]) == "latent_kernel"


def latent_kernel_mask(params) -> Any:
    """A pytree of bools, True at every ``latent_kernel`` leaf (for ``optax.masked``, Bop)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_latent_kernel_path(p), params)


def clip_latent_weights(params, clip_value: float | None):
    """Clip every ``latent_kernel`` leaf to ``[-clip_value, clip_value]``; others unchanged.

    BNN (Courbariaux et al. 2016) clips latent weights to [−1, 1] after each update, as
    Larq's ``weight_clip`` constraint does. ``clip_value=None`` returns ``params`` as is.
    Pure, so the trainer can call it inside its jitted step.
    """
    if clip_value is None:
        return params
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0 or None; got {clip_value!r}.")
    return jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.clip(v, -clip_value, clip_value) if is_latent_kernel_path(p) else v, params
    )
