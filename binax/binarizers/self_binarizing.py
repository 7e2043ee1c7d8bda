"""Self-Binarizing networks (Lahoud & Achanta 2019): ``tanh_sign``, a tanh whose slope
``nu`` grows by ``nu_schedule`` until it is the sign it deploys as.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from binax.binarizers._common import _f32, _zero_like, _sech2

Array = jax.Array


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
    (the default) is one geometric ramp ``nu_0 * (nu_max / nu_0) ** p``. The paper says only
    that nu grows during training (Lahoud & Achanta 2019, no official code); binax's recipe is in ``configs/recipe.py``. The default
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
