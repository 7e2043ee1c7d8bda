"""IR-Net (Qin et al. CVPR 2020): the Error Decay Estimator ``ede_sign`` with its schedule
``ede_params``, and Libra-PB's balanced, standardized weights ``libra_pb``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from binax.binarizers._common import (
    _channel_mean_abs,
    _check_per_channel_kernel,
    _f32,
    _reduce_axes,
    _sech2,
    _sign_forward,
    _zero_like,
)

Array = jax.Array


@jax.custom_vjp
def _ede_sign(x, t, k):
    return _sign_forward(x)


def _ede_sign_fwd(x, t, k):
    return _sign_forward(x), (x, t, k)


def _ede_sign_bwd(res, g):
    x, t, k = res
    grad = k * t * _sech2(t * x.astype(jnp.float32))
    return g * grad.astype(g.dtype), _zero_like(t), _zero_like(k)


_ede_sign.defvjp(_ede_sign_fwd, _ede_sign_bwd)


def ede_sign(x: Array, t: float | Array, k: float | Array) -> Array:
    """Sign with the Error Decay Estimator backward (IR-Net, Qin et al. CVPR 2020).

    Forward: ``sign(x)``. Backward: ``g * k * t * (1 - tanh(t*x)**2)``.
    ``t`` and ``k`` come from ``ede_params(progress)``; they are traced values with zero
    cotangent.
    """
    return _ede_sign(x, _f32(t), _f32(k))


def ede_params(
    progress: float | Array, t_min: float = 0.1, t_max: float = 10.0
) -> tuple[Array, Array]:
    """IR-Net's EDE schedule: ``(t, k)`` as a function of training progress in [0, 1].

    ``t = 10 ** (log10 t_min + (log10 t_max - log10 t_min) * progress)``,
    ``k = max(1/t, 1)``. The official code evaluates it once per epoch
    (``progress = epoch / epochs``); T_min = 0.1 (VGG-small) or 1e-3 (ResNet-20 1w1a).
    """
    if not (t_min > 0 and t_max > 0):
        raise ValueError(f"ede_params needs t_min > 0 and t_max > 0; got t_min={t_min}, t_max={t_max}.")
    p = _f32(progress)
    lo, hi = math.log10(t_min), math.log10(t_max)
    t = jnp.power(_f32(10.0), lo + (hi - lo) * p)
    k = jnp.maximum(1.0 / t, 1.0)
    return t, k


def _standardize_per_channel(w: Array) -> Array:
    """``(w − mean) / std`` per output channel, std with ddof = 1 (``torch.std``).

    A constant channel (std 0; the official code divides 0 by 0) maps to 0 here, with a
    finite gradient: the double ``where`` keeps the NaN of sqrt'(0) out of the backward.
    """
    axes = _reduce_axes(w)
    n = math.prod(w.shape[:-1])
    mean = jnp.mean(w, axis=axes, keepdims=True)
    centered = w - mean
    var = jnp.sum(centered * centered, axis=axes, keepdims=True) / max(n - 1, 1)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 1.0)
    return centered / std


def libra_pb(w: Array, t: float | Array, k: float | Array) -> Array:
    """IR-Net Libra-PB weight binarizer (Qin et al. CVPR 2020; official code htqin/IR-Net).

    Per output channel: ``ŵ = (w − mean(w)) / std(w)`` with the unbiased std (ddof = 1),
    mean and std NOT stopped, so the gradient flows through the standardization;
    ``Q(w) = ede_sign(ŵ, t, k) * s`` with ``s = 2 ** round(log2(mean|ŵ|))`` per channel,
    held constant in the backward. The paper's entropy term is not in the official code,
    and binax follows the code.

    Backward: ``∂ŵ = g * s * k * t * (1 − tanh(t ŵ)**2)``, then through the
    standardization's Jacobian. Statistics are computed in float32; a constant channel
    (std 0) gives 0 rather than the official code's NaN.
    """
    _check_per_channel_kernel(w, "libra_pb")
    # Statistics in float32: a bfloat16 mean/std would misplace the sign boundary.
    w_hat = _standardize_per_channel(w.astype(jnp.float32))
    s = jax.lax.stop_gradient(jnp.exp2(jnp.round(jnp.log2(_channel_mean_abs(w_hat)))))
    return (ede_sign(w_hat, t, k) * s).astype(w.dtype)
