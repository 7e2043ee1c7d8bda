"""Layers without MACs: BinaryBatchNorm (folded BN → sign), ReActNet's RSign and RPReLU, a learned shift."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from binax.layers.binary import Spec, _quantize
from binax.layers.descriptor import LayerDescriptor, register

Array = jax.Array

__all__ = ["BinaryBatchNorm", "LearnableShift", "RSign", "RPReLU"]

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


# The sign bit s is one bit; the threshold a float. Its output is ±1: no activation follows.
register(BinaryBatchNorm, LayerDescriptor(param_bits={"sign": 1}, binary_output=True))


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

