"""The sign and its straight-through estimators: ``sign``, ``ste_sign`` (BNN, Hubara et al.
2016), ``approx_sign`` (Bi-Real Net, Liu et al. 2018), ``swish_sign`` (BNN+, Darabi et al.
2018), and XNOR-Net's scaled sign for weights, ``xnor_weight`` (Rastegari et al. 2016).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from binax.binarizers._common import (
    _channel_mean_abs,
    _check_per_channel_kernel,
    _f32,
    _sign_forward,
    _within_clip,
    _zero_like,
)

Array = jax.Array


def sign(x: Array) -> Array:
    """Hard sign with ``sign(0) = +1``; zero gradient almost everywhere (its true gradient).

    Forward: ``+1 if x >= 0 else -1``. Backward: 0.
    Used at inference and as the forward of every ``*_sign`` estimator below.
    """
    return _sign_forward(x)


@jax.custom_vjp
def _ste_sign_clipped(x, clip_value):
    return _sign_forward(x)


def _ste_sign_clipped_fwd(x, clip_value):
    return _sign_forward(x), (x, clip_value)


def _ste_sign_clipped_bwd(res, g):
    x, clip_value = res
    return g * _within_clip(x, clip_value, g.dtype), _zero_like(clip_value)


_ste_sign_clipped.defvjp(_ste_sign_clipped_fwd, _ste_sign_clipped_bwd)


@jax.custom_vjp
def _ste_sign_identity(x):
    return _sign_forward(x)


_ste_sign_identity.defvjp(lambda x: (_sign_forward(x), None), lambda _, g: (g,))


def ste_sign(x: Array, clip_value: float | Array | None = 1.0) -> Array:
    """Straight-through sign (BNN, Hubara et al. 2016; Larq ``ste_sign``).

    Forward: ``sign(x)`` (0 -> +1).
    Backward: ``g * 1[|x| <= clip_value]``; ``clip_value=None`` passes ``g`` unchanged.
    """
    if clip_value is None:
        return _ste_sign_identity(x)
    return _ste_sign_clipped(x, _f32(clip_value))


@jax.custom_vjp
def approx_sign(x: Array) -> Array:
    """ApproxSign (Bi-Real Net, Liu et al. 2018).

    Forward: ``sign(x)``. Backward: ``g * max(0, 2 - 2|x|)`` (the derivative of the
    piecewise-quadratic approximation of sign).
    """
    return _sign_forward(x)


def _approx_sign_fwd(x):
    return _sign_forward(x), x


def _approx_sign_bwd(x, g):
    grad = jnp.maximum(0.0, 2.0 - 2.0 * jnp.abs(x.astype(jnp.float32)))
    return (g * grad.astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


@jax.custom_vjp
def _swish_sign(x, beta):
    return _sign_forward(x)


def _swish_sign_fwd(x, beta):
    return _sign_forward(x), (x, beta)


def _swish_sign_bwd(res, g):
    x, beta = res
    bx = beta * x.astype(jnp.float32)
    grad = beta * (2 - bx * jnp.tanh(bx / 2)) / (1 + jnp.cosh(bx))
    return g * grad.astype(g.dtype), _zero_like(beta)


_swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


def swish_sign(x: Array, beta: float | Array = 5.0) -> Array:
    """SwishSign (BNN+, Darabi et al. 2018; Larq ``swish_sign``).

    Forward: ``sign(x)``.
    Backward: ``g * beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x))``, the
    derivative of ``2*sigmoid(beta*x)*(1 + beta*x*(1 - sigmoid(beta*x))) - 1``.
    """
    return _swish_sign(x, _f32(beta))


def xnor_weight(w: Array) -> Array:
    """XNOR-Net weight binarizer (Rastegari et al. 2016).

    Forward: ``alpha * sign(W)``, ``alpha = mean|W|`` per output channel (last axis).
    Backward: straight through the sign with the scale held constant, ``g * alpha``.
    (Larq Zoo clips latent weights to [-1, 1], so an extra ``1[|W| <= 1]`` would change
    nothing there; binax leaves clipping to the layer's latent-weight constraint.)
    """
    _check_per_channel_kernel(w, "xnor_weight")
    alpha = jax.lax.stop_gradient(_channel_mean_abs(w)).astype(w.dtype)
    return _ste_sign_identity(w) * alpha
