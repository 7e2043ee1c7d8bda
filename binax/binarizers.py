"""Binarizers: pure forward/backward estimators for binary (and few-bit) networks.

Every estimator is a plain function built on ``jax.custom_vjp``: the forward is the
quantizer, the backward the paper's surrogate gradient. Formulas follow
``shared/reference/methods.md``; the conventions binax keeps everywhere:

* ``sign(0) = +1`` (as Larq does; ``jnp.sign(0)`` is 0).
* A kernel's LAST axis is its output channel; "per output channel" reduces over every
  other axis.
* "STE on [a, b]" means forward as stated, backward ``g * 1[a <= x <= b]``.
* Schedule values (EDE's ``t``/``k``, tanh's ``nu``, clip values) are ordinary, possibly
  traced, array arguments whose cotangent is zero. They are never ``nondiff_argnums`` and
  never Python constants baked into a trace, so moving them during training does not
  recompile.
* Outputs keep the input's dtype (float32, bfloat16, ...). Schedule arithmetic runs in
  float32 and is cast once.

Names are a public contract (configs and outside code call them by these names). Each
binarizer is registered with its :class:`~binax.quantizer.Quantizer` descriptor (bits,
forward value set, schedule, inference form) at the end of this module; the registry
functions of :mod:`binax.quantizer` are re-exported here: ``get(name)`` maps config strings
to the functions, ``describe(spec)`` to the descriptors, ``register(name, fn, *, bits, ...)``
adds one, and ``resolve(spec, **kw)`` turns a spec into a ``fn(x, progress)`` that derives
schedule values from training progress.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from binax._checks import static_int
from binax.quantizer import Quantizer, deployed, describe, get, import_plugins, names, register, resolve

Array = jax.Array

__all__ = [
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "ede_sign",
    "ede_params",
    "tanh_sign",
    "nu_schedule",
    "ste_heaviside",
    "duo_binary",
    "duo_ternary",
    "ste_tern",
    "dorefa",
    "xnor_weight",
    "libra_pb",
    "abc_weight_bases",
    "abc_weight",
    "duo_weight",
    "abc_activation",
    "Quantizer",
    "deployed",
    "describe",
    "get",
    "import_plugins",
    "names",
    "register",
    "resolve",
]


# --------------------------------------------------------------------------- helpers


def _f32(v) -> Array:
    """A schedule value as a float32 array (traced or not); float32 keeps t**k exact enough."""
    return jnp.asarray(v, dtype=jnp.float32)


def _zero_like(v: Array) -> Array:
    return jnp.zeros_like(v)


def _sign_forward(x: Array) -> Array:
    return jnp.where(x >= 0, 1, -1).astype(x.dtype)


def _sech2(z: Array) -> Array:
    """``1 − tanh(z)**2`` as ``1 / cosh(z)**2``: no cancellation for large |z|.

    In float32, ``1 − tanh(6)**2`` keeps only 3 significant digits; this form keeps them
    all, and underflows to 0 (not NaN) where cosh overflows.
    """
    c = jnp.cosh(z)
    return 1.0 / (c * c)


def _in_range(x: Array, lo, hi) -> Array:
    return ((x >= lo) & (x <= hi)).astype(x.dtype)


def _within_clip(x: Array, clip_value: Array, dtype) -> Array:
    """``1[|x| <= clip_value]`` compared in float32.

    Comparing in float32 keeps the boundary where the caller put it: casting a clip value
    such as 0.3 to bfloat16 would move it, and a bfloat16 ``x`` is exact in float32.
    """
    return (jnp.abs(x.astype(jnp.float32)) <= clip_value).astype(dtype)


def _clip_or_inf(clip_value) -> Array:
    """A clip value as float32; ``None`` (no clipping, as in Larq) becomes +inf."""
    return _f32(jnp.inf if clip_value is None else clip_value)


def _check_per_channel_kernel(w: Array, fn_name: str) -> None:
    if w.ndim < 2:
        raise ValueError(
            f"{fn_name} needs a kernel of rank >= 2 with the output channel last "
            f"(Dense (in, out), Conv (h, w, in, out)); got shape {tuple(w.shape)} (rank {w.ndim})."
        )


def _reduce_axes(w: Array) -> tuple[int, ...]:
    """Every axis but the last (output channel)."""
    return tuple(range(w.ndim - 1))


# ----------------------------------------------------------------- sign and its STEs


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


# ------------------------------------------------------------------- IR-Net: EDE


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


# ------------------------------------------------------- Self-Binarizing: tanh(nu x)


def _tanh_f32(x, nu):
    # float32 so that a bfloat16 x sees the same nu (and the same tanh) as a float32 one.
    return jnp.tanh(nu * x.astype(jnp.float32))


@jax.custom_vjp
def _tanh_sign(x, nu):
    return _tanh_f32(x, nu).astype(x.dtype)


def _tanh_sign_fwd(x, nu):
    return _tanh_f32(x, nu).astype(x.dtype), (x, nu)


def _tanh_sign_bwd(res, g):
    x, nu = res
    return g * (nu * _sech2(nu * x.astype(jnp.float32))).astype(g.dtype), _zero_like(nu)


_tanh_sign.defvjp(_tanh_sign_fwd, _tanh_sign_bwd)


def tanh_sign(x: Array, nu: float | Array, relative: bool = False) -> Array:
    """Self-Binarizing soft sign (Lahoud & Achanta 2019): ``tanh(nu * x)``, true gradient.

    Forward: ``tanh(nu*x)``. Backward: ``g * nu * (1 - tanh(nu*x)**2)``; ``nu`` is a
    schedule value (zero cotangent). As ``nu`` grows it approaches ``sign``; at the end of
    training binax swaps it for ``sign`` (see ``binax.transforms``).

    ``relative=True`` measures ``x`` in units of its own magnitude:
    ``tanh(nu * x / m)`` with ``m = mean|x|`` over the whole tensor, held constant in the
    backward (``g * (nu/m) * (1 - tanh(nu*x/m)**2)``; ``m = 0`` leaves ``nu`` as is). A
    weight tensor (``|w| ~ 0.05``) then sharpens with the same ``nu`` as a batch-normed
    activation (``|x| ~ 1``) instead of ~20x later. ``sign`` is unchanged by the scale.
    """
    nu = _f32(nu)
    if relative:
        m = jax.lax.stop_gradient(jnp.mean(jnp.abs(x.astype(jnp.float32))))
        nu = nu / jnp.where(m > 0, m, 1.0)
    return _tanh_sign(x, nu)


def nu_schedule(
    progress: float | Array,
    nu_0: float = 1.0,
    nu_max: float = 1000.0,
    start: float = 0.0,
    nu_start: float | None = None,
) -> Array:
    """Sharpening schedule for ``tanh_sign``: geometric from ``nu_0`` to ``nu_start`` over
    progress ``[0, start]``, then geometric from ``nu_start`` to ``nu_max`` over ``[start, 1]``.

    ``nu = nu_0 * (nu_start / nu_0) ** (p / start)`` for ``p < start``, then
    ``nu = nu_start * (nu_max / nu_start) ** ((p - start) / (1 - start))``.
    ``nu_start=None`` (= ``nu_0``) holds nu at ``nu_0`` until ``start``; ``start = 0``
    (the default) is one geometric ramp ``nu_0 * (nu_max / nu_0) ** p``. The paper gives no
    exact schedule (methods.md); binax's recipe is in ``configs/recipe.py``. The default
    ``nu_max = 1000`` makes ``tanh(nu x)`` within 1e-3 of ``sign(x)`` for ``|x| >= 0.004``;
    the recipe needs far more for the trained network to BE the sign network on every
    test image.
    """
    nu_s = nu_0 if nu_start is None else nu_start
    if not (nu_0 > 0 and nu_max > 0 and nu_s > 0):
        raise ValueError(
            f"nu_schedule needs nu_0, nu_start and nu_max > 0; got nu_0={nu_0}, nu_start={nu_start}, nu_max={nu_max}."
        )
    if not 0.0 <= start < 1.0:
        raise ValueError(f"nu_schedule needs 0 <= start < 1 (the progress where sharpening begins); got start={start}.")
    p = _f32(progress)
    if not start:
        return _f32(nu_0) * jnp.power(_f32(nu_max / nu_0), p)
    first = _f32(nu_0) * jnp.power(_f32(nu_s / nu_0), jnp.clip(p / start, 0.0, 1.0))
    second = _f32(nu_s) * jnp.power(_f32(nu_max / nu_s), jnp.clip((p - start) / (1.0 - start), 0.0, 1.0))
    return jnp.where(p < start, first, second)


# ----------------------------------------------------------- {0, 1} and ternary


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


# ------------------------------------------------------------- weight binarizers


def _channel_mean_abs(w: Array) -> Array:
    """``mean|w|`` per output channel, accumulated in float32."""
    return jnp.mean(jnp.abs(w.astype(jnp.float32)), axis=_reduce_axes(w), keepdims=True)


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


# ------------------------------------------------------------------------ registry


def _ede_schedule(progress, t_min: float = 0.1, t_max: float = 10.0) -> dict[str, Array]:
    t, k = ede_params(progress, t_min=t_min, t_max=t_max)
    return {"t": t, "k": k}


def _nu_schedule(
    progress, nu_0: float = 1.0, nu_max: float = 1000.0, start: float = 0.0, nu_start: float | None = None
) -> dict[str, Array]:
    return {"nu": nu_schedule(progress, nu_0=nu_0, nu_max=nu_max, start=start, nu_start=nu_start)}


def _dorefa_levels(k_bit: int = 2) -> tuple[float, float, int]:
    n = 2 ** static_int(k_bit, "k_bit") - 1
    return 0.0, 1.0 / n, n


# What each binarizer is (binax.quantizer.Quantizer): the one place that says so.
register("sign", sign, bits=1, forward="sign")
register("ste_sign", ste_sign, bits=1, forward="sign")
register("approx_sign", approx_sign, bits=1, forward="sign")
register("swish_sign", swish_sign, bits=1, forward="sign")
register("ede_sign", ede_sign, bits=1, forward="sign", schedule=_ede_schedule, schedule_outputs=("t", "k"))
# Self-Binarizing networks train tanh(nu x) and deploy its limit, sign (Lahoud & Achanta 2019).
register(
    "tanh_sign", tanh_sign, bits=1, schedule=_nu_schedule, schedule_outputs=("nu",), inference="sign"
)
register("ste_heaviside", ste_heaviside, bits=1, forward="levels", levels=(0.0, 1.0, 1))
register("duo_binary", duo_binary, bits=1, forward="levels", levels=(0.0, 1.0, 1))
# Two bits, counted as two binary activations: BinaryDuo decouples it into two.
register("duo_ternary", duo_ternary, bits=2, forward="levels", levels=(0.0, 0.5, 2), binary_planes=2)
register("ste_tern", ste_tern, bits=2, forward="levels", levels=(-1.0, 1.0, 2))
register("dorefa", dorefa, bits=lambda k_bit=2: k_bit, forward="levels", levels=_dorefa_levels)
register("xnor_weight", xnor_weight, bits=1, forward="scaled_sign", scale_equivariant=True)
register("libra_pb", libra_pb, bits=1, forward="scaled_sign", schedule=_ede_schedule, schedule_outputs=("t", "k"))
# M bases of one bit each: M bits, M binary planes (ABC-Net).
register("abc_weight", abc_weight, bits=lambda m=1: m, binary_planes=lambda m=1: m)
register("duo_weight", duo_weight, bits=1, forward="scaled_sign", scale_equivariant=True)
