"""Activations in {0, 1} and few levels: ``ste_heaviside`` (Larq), BinaryDuo's ``duo_binary``
and ``duo_ternary`` with its weight binarizer ``duo_weight`` (Kim et al. ICLR 2020),
``ste_tern`` and ``dorefa`` (Zhou et al. 2016).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from binax._checks import static_int
from binax.binarizers._common import _f32, _zero_like, _sign_forward, _in_range, _within_clip, _clip_or_inf

Array = jax.Array


@jax.custom_vjp
def _ste_heaviside(x, clip_value):
    return (x > 0).astype(x.dtype)


def _ste_heaviside_fwd(x, clip_value):
    return (x > 0).astype(x.dtype), (x, clip_value)


def _ste_heaviside_bwd(res, g):
    x, clip_value = res
    return g * _within_clip(x, clip_value, g.dtype), _zero_like(clip_value)


_ste_heaviside.defvjp(_ste_heaviside_fwd, _ste_heaviside_bwd)


def ste_heaviside(x: Array, clip_value: float | Array | None = 1.0) -> Array:
    """Straight-through Heaviside (Larq ``ste_heaviside``): values in {0, 1}.

    Forward: ``1 if x > 0 else 0`` (0 -> 0). Backward: ``g * 1[|x| <= clip_value]``;
    ``clip_value=None`` passes ``g`` unchanged.
    """
    return _ste_heaviside(x, _clip_or_inf(clip_value))


def _unit_ste_bwd(x, g):
    return (g * _in_range(x, 0, 1).astype(g.dtype),)


@jax.custom_vjp
def duo_binary(x: Array) -> Array:
    """BinaryDuo binary activation (Kim et al. ICLR 2020): values in {0, 1}.

    Forward: ``1[clip(x, 0, 1) >= 0.5]`` (= ``1[x >= 0.5]``). Backward: STE on [0, 1],
    ``g * 1[0 <= x <= 1]``.
    """
    return (x >= 0.5).astype(x.dtype)


duo_binary.defvjp(lambda x: ((x >= 0.5).astype(x.dtype), x), _unit_ste_bwd)


def _duo_ternary_forward(x):
    half = jnp.asarray(0.5, x.dtype)
    return half * (x >= 0.25).astype(x.dtype) + half * (x >= 0.75).astype(x.dtype)


@jax.custom_vjp
def duo_ternary(x: Array) -> Array:
    """BinaryDuo coupled ternary activation: values in {0, 1/2, 1}.

    Forward: ``1/2 * 1[x >= 0.25] + 1/2 * 1[x >= 0.75]`` = ``round(2*clip(x, 0, 1))/2``
    with rounding half UP (``jnp.round`` rounds half to even and would break the exact
    decoupling into two binary activations). Backward: STE on [0, 1].
    """
    return _duo_ternary_forward(x)


duo_ternary.defvjp(lambda x: (_duo_ternary_forward(x), x), _unit_ste_bwd)


@jax.custom_vjp
def _ste_tern(x, threshold, clip_value):
    return _tern_forward(x, threshold)


def _tern_forward(x, threshold):
    # Larq's formula with tf.sign (= jnp.sign, 0 -> 0). In floating point x ± θ is 0 exactly
    # when x = ∓θ, so this is +1 for x >= θ, -1 for x <= -θ, 0 between -- and 0 for
    # θ <= 0 at x = 0, where a "x >= θ" shortcut would give +1.
    x32 = x.astype(jnp.float32)
    return jnp.sign(jnp.sign(x32 + threshold) + jnp.sign(x32 - threshold)).astype(x.dtype)


def _ste_tern_fwd(x, threshold, clip_value):
    return _tern_forward(x, threshold), (x, threshold, clip_value)


def _ste_tern_bwd(res, g):
    x, threshold, clip_value = res
    return g * _within_clip(x, clip_value, g.dtype), _zero_like(threshold), _zero_like(clip_value)


_ste_tern.defvjp(_ste_tern_fwd, _ste_tern_bwd)


def ste_tern(
    x: Array,
    threshold_value: float | Array = 0.05,
    ternary_weight_networks: bool = False,
    clip_value: float | Array | None = 1.0,
) -> Array:
    """Ternary straight-through quantizer (Larq ``ste_tern``): values in {-1, 0, +1}.

    Forward: ``sign(sign(x + θ) + sign(x − θ))`` with every sign mapping 0 to 0 as Larq's
    ``tf.sign`` does: for θ > 0 that is ``+1 if x >= θ``, ``-1 if x <= -θ``, else 0 (the
    boundaries ±θ go to ±1), and for θ = 0 it is ``tf.sign(x)`` (0 -> 0). Evaluated in
    float32, so θ is not rounded to a bfloat16 ``x``'s precision.
    ``θ = threshold_value``, or with ``ternary_weight_networks=True`` (TWN, Li et al.
    2016) ``θ = 0.7 * mean|x|`` over the whole tensor (treated as a constant).
    Backward: ``g * 1[|x| <= clip_value]``; ``clip_value=None`` passes ``g`` unchanged.
    """
    if ternary_weight_networks:
        threshold = jax.lax.stop_gradient(0.7 * jnp.mean(jnp.abs(x.astype(jnp.float32))))
    else:
        threshold = _f32(threshold_value)
    return _ste_tern(x, threshold, _clip_or_inf(clip_value))


def dorefa(x: Array, k_bit: int = 2) -> Array:
    """DoReFa activation quantizer (Zhou et al. 2016), activation mode.

    Forward: ``q_k(clip(x, 0, 1))`` with ``q_k(v) = round((2^k − 1) v) / (2^k − 1)``;
    ``round`` is half to even, as ``tf.round`` in the DoReFa code (for ``k_bit=1``,
    ``x = 0.5`` maps to 0). Computed in float32 and cast back.
    Backward: STE on [0, 1]: ``g * 1[0 <= x <= 1]``. ``k_bit`` is a static integer >= 1
    (a precision choice, not a schedule).
    """
    n = float(2 ** static_int(k_bit, "k_bit") - 1)
    return _dorefa(x, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dorefa(x, n):
    # n is a static level count (a precision choice, not a schedule): nondiff is right here.
    return _dorefa_forward(x, n)


def _dorefa_forward(x, n):
    # float32: (2^k - 1) * x in bfloat16 would already be rounded before jnp.round.
    return (jnp.round(jnp.clip(x.astype(jnp.float32), 0, 1) * n) / n).astype(x.dtype)


def _dorefa_fwd(x, n):
    return _dorefa_forward(x, n), x


def _dorefa_bwd(n, x, g):
    return (g * _in_range(x, 0, 1).astype(g.dtype),)


_dorefa.defvjp(_dorefa_fwd, _dorefa_bwd)


def _duo_weight_forward(w):
    alpha = jnp.mean(jnp.abs(w.astype(jnp.float32))).astype(w.dtype)
    return _sign_forward(w) * alpha


@jax.custom_vjp
def duo_weight(w: Array) -> Array:
    """BinaryDuo weight binarizer: ``sign(w) * mean|w|`` with ONE scale per layer.

    Forward: ``alpha * sign(w)``, ``alpha = mean|w|`` over the whole kernel (0 -> +1).
    Backward: ``g`` unchanged: the gradient with respect to the binarized weight ``W_Q``
    goes to the latent ``w`` as it is, not times ``alpha``. The official code
    (Hyungjun-K1m/BinaryDuo, ``newLayers/cudnnQuantSpatialConvolution.lua``) computes
    ``gradWeight`` from the input and output gradients only and applies it to the latent
    weights; DoReFa's 1-bit weights, ``sign(w/E)*E`` with an identity gradient for
    ``sign``, give the same ``g``.
    """
    return _duo_weight_forward(w)


duo_weight.defvjp(lambda w: (_duo_weight_forward(w), None), lambda _, g: (g,))
