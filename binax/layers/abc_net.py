"""ABC-Net layers (Lin et al. NIPS 2017): M weight bases × N activation bases, and their descriptors."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from binax import binarizers
from binax.layers.binary import _ConvGeometry, _check_conv_input, _glorot
from binax.layers.descriptor import Geometry, LayerDescriptor, register
from binax.packed import geometry

Array = jax.Array

__all__ = ["ABCDense", "ABCConv"]

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


# ------------------------------------------------------------------ descriptors


def _bases(module) -> tuple[int, int]:
    return module.m, module.n


def _bases_fn(module) -> tuple:
    # The exporter stores the M sign bases and their scales, not their sum.
    return binarizers.abc_weight_bases, {"m": module.m}


def _abc_geometry(module) -> Geometry:
    return Geometry(module.window, module.strides, module.padding, module.kernel_dilation, 1, module.pad_value)


def _abc_forward(module, x: Array, kernel: Array, arrays) -> Array:
    """ABC-Net's float math with the kernel ``Σ_m α_m B_m``."""
    a = binarizers.abc_activation(x, arrays["shifts"], arrays["betas"])
    return module.combine(a, kernel, arrays["betas"], arrays.get("bias"))


register(
    ABCDense,
    LayerDescriptor(product="dense", bases=_bases, kernel_function=_bases_fn, export="abc", float_forward=_abc_forward),
)
register(
    ABCConv,
    LayerDescriptor(
        product="conv",
        bases=_bases,
        kernel_function=_bases_fn,
        geometry=_abc_geometry,
        export="abc",
        float_forward=_abc_forward,
    ),
)
