"""ABC-Net (Lin et al. NeurIPS 2017): ``abc_weight_bases``/``abc_weight``, a kernel as M
scaled binary bases, and ``abc_activation``, N shifted binary activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from binax._checks import static_int
from binax.binarizers._common import _sign_forward, _in_range

Array = jax.Array


def _check_m(m) -> int:
    return static_int(m, "m (the number of ABC-Net weight bases)")


def _abc_shifts(m: int) -> list[float]:
    """ABC-Net's u_i = −1 + 2(i − 1)/(M − 1), i = 1..M (u = 0 when M = 1)."""
    if m == 1:
        return [0.0]
    return [-1.0 + 2.0 * i / (m - 1) for i in range(m)]


def abc_weight_bases(w: Array, m: int) -> tuple[Array, Array]:
    """ABC-Net weight bases (Lin et al. NIPS 2017): ``W ≈ Σ_i α_i B_i``.

    ``B_i = sign(W − mean(W) + u_i * std(W))`` with ``u_i = −1 + 2(i − 1)/(M − 1)``
    (layer-wise mean and population std over the whole tensor, as the paper states);
    ``α = argmin ‖vec(W) − [vec(B_1) … vec(B_M)] α‖²`` by least squares, recomputed from
    the current W. Returns ``(bases, alphas)``, ``bases.shape == (m, *w.shape)``,
    ``alphas.shape == (m,)``. No gradient flows through this function; use
    ``abc_weight`` for training.
    """
    bases, alphas = _abc_bases_f32(w, _check_m(m))
    return bases.astype(w.dtype), alphas.astype(w.dtype)


def _abc_bases_f32(w: Array, m: int) -> tuple[Array, Array]:
    """float32 bases ``(m, *w.shape)`` and least-squares alphas ``(m,)``; no gradient."""
    w32 = jax.lax.stop_gradient(w).astype(jnp.float32)
    mean, std = jnp.mean(w32), jnp.std(w32)
    bases = jnp.stack([_sign_forward(w32 - mean + u * std) for u in _abc_shifts(m)])
    design = bases.reshape(m, -1).T  # (numel, m)
    # lstsq (SVD) rather than the normal equations: bases can coincide (e.g. a constant W),
    # and then it returns the minimum-norm alphas instead of a singular solve.
    alphas = jnp.linalg.lstsq(design, w32.reshape(-1))[0]
    return bases, alphas


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _abc_weight(w, m):
    bases, alphas = _abc_bases_f32(w, m)
    return jnp.tensordot(alphas, bases, axes=1).astype(w.dtype)


def _abc_weight_fwd(w, m):
    bases, alphas = _abc_bases_f32(w, m)
    return jnp.tensordot(alphas, bases, axes=1).astype(w.dtype), jnp.sum(alphas)


def _abc_weight_bwd(m, alpha_sum, g):
    return (g * alpha_sum.astype(g.dtype),)


_abc_weight.defvjp(_abc_weight_fwd, _abc_weight_bwd)


def abc_weight(w: Array, m: int) -> Array:
    """ABC-Net combined weight ``Σ_i α_i B_i`` with the paper's STE backward.

    Forward: ``Σ_i α_i B_i`` from ``abc_weight_bases(w, m)``.
    Backward (paper eq. 5): ``∂c/∂W = Σ_i α_i ∂c/∂B_i`` where ``∂c/∂B_i`` is the gradient
    reaching the i-th binary kernel before its α scaling, i.e. ``g`` for every base, so
    ``∂c/∂W = (Σ_i α_i) * g`` with α held constant. ``m`` is a static Python int.
    """
    return _abc_weight(w, _check_m(m))


@jax.custom_vjp
def _abc_activation(x, shifts, betas):
    return _abc_activation_forward(x, shifts, betas)


def _abc_heavisides(x, shifts):
    # (N, *x.shape) float32: x + v_n and H_v(x) = 2 * 1[clip(x + v, 0, 1) >= 0.5] − 1.
    # float32 so a bfloat16 x is shifted by the exact learned v, not a rounded one.
    shifted = x.astype(jnp.float32)[None] + shifts.astype(jnp.float32).reshape((-1,) + (1,) * x.ndim)
    return shifted, 2 * (jnp.clip(shifted, 0, 1) >= 0.5).astype(jnp.float32) - 1


def _abc_activation_forward(x, shifts, betas):
    _, h = _abc_heavisides(x, shifts)
    return jnp.tensordot(betas.astype(jnp.float32), h, axes=1).astype(x.dtype)


def _abc_activation_fwd(x, shifts, betas):
    return _abc_activation_forward(x, shifts, betas), (x, shifts, betas)


def _abc_activation_bwd(res, g):
    x, shifts, betas = res
    shifted, h = _abc_heavisides(x, shifts)
    g32 = g.astype(jnp.float32)[None]
    # STE through the clip: dH_v/dx = 2 * 1[0 <= x + v <= 1].
    b = betas.astype(jnp.float32).reshape((-1,) + (1,) * x.ndim)
    per_base = b * 2 * _in_range(shifted, 0, 1) * g32  # (N, *x.shape)
    reduce = tuple(range(1, per_base.ndim))
    gx = jnp.sum(per_base, axis=0).astype(x.dtype)
    g_shifts = jnp.sum(per_base, axis=reduce).astype(shifts.dtype)
    g_betas = jnp.sum(h * g32, axis=reduce).astype(betas.dtype)
    return gx, g_shifts, g_betas


_abc_activation.defvjp(_abc_activation_fwd, _abc_activation_bwd)


def abc_activation(x: Array, shifts: Array, betas: Array) -> Array:
    """ABC-Net multiple binary activations: ``A = Σ_n β_n H_{v_n}(x)``.

    ``H_v(x) = 2 * 1[clip(x + v, 0, 1) >= 0.5] − 1`` ∈ {−1, +1}; ``shifts`` (v_n) and
    ``betas`` (β_n) are learned vectors of length N.
    Backward (STE through the clip, the indicator replaced by identity):
    ``∂x = Σ_n β_n * 2 * 1[0 <= x + v_n <= 1] * g``; ``∂v_n`` is the same term summed over
    the tensor; ``∂β_n = Σ H_{v_n}(x) * g``.
    """
    shifts = jnp.atleast_1d(jnp.asarray(shifts))
    betas = jnp.atleast_1d(jnp.asarray(betas))
    if shifts.shape != betas.shape or shifts.ndim != 1:
        raise ValueError(
            f"abc_activation needs 1-D shifts and betas of equal length N; got shapes "
            f"{tuple(shifts.shape)} and {tuple(betas.shape)}."
        )
    return _abc_activation(x, shifts, betas)
