"""Tests for binax.binarizers: every estimator against its written-out formula.

Forward references are NumPy expressions of the papers' formulas (as each binarizer's
docstring gives them); backward references are the surrogate gradients written out
independently (a finite difference cannot check an STE: the forward is piecewise constant).
Inputs include exact zeros (both signs) and the clip boundaries.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binax import binarizers as b

# Exact zeros of both signs, the clip boundaries ±1 and ±0.5, BinaryDuo's 0.25 / 0.75, points
# just inside and outside them, and values past every clip. Length 24 so it reshapes for vmap.
X = np.array(
    [-2.0, -1.5, -1.0, -0.999, -0.75, -0.5, -0.3, -0.25, -0.05, -0.01, -0.0, 0.0,
     0.01, 0.05, 0.24, 0.25, 0.3, 0.49, 0.5, 0.75, 0.999, 1.0, 1.001, 2.0],
    dtype=np.float32,
)
G = np.linspace(-1.3, 1.7, X.size).astype(np.float32)  # an arbitrary, nonzero cotangent

# float32 backward vs float64 NumPy formulas: a few float32 ulps of tanh/cosh, and the
# cancellation that SwishSign's numerator has near its zero crossing.
RTOL, ATOL = 1e-5, 1e-6


def f32(v) -> np.float64:
    """A schedule value as binax sees it (float32), for use in float64 references."""
    return np.float64(np.float32(v))


def np_sign(x):
    return np.where(x >= 0, 1.0, -1.0)


def vjp_x(fn, x, g, *args):
    """The cotangent of ``x`` for output cotangent ``g``."""
    _, pullback = jax.vjp(lambda x_: fn(x_, *args), jnp.asarray(x))
    return np.asarray(pullback(jnp.asarray(g, dtype=jnp.asarray(x).dtype))[0])


# ------------------------------------------------------------ elementwise estimators


@dataclasses.dataclass(frozen=True)
class Case:
    """One estimator: ``fn(x, *sched)`` with its NumPy forward/backward references."""

    id: str
    fn: Callable
    sched: tuple  # schedule-like arguments: traced, zero cotangent
    fwd: Callable  # (x, *sched) -> forward, float64
    bwd: Callable  # (x, g, *sched) -> cotangent of x, float64
    alt_sched: tuple = ()  # other schedule values, for the retrace test


def _tern_ref(x, th):
    th = f32(th)
    return np.sign(np.sign(x + th) + np.sign(x - th))


def _swish_grad(x, beta):
    bx = f32(beta) * x
    return f32(beta) * (2 - bx * np.tanh(bx / 2)) / (1 + np.cosh(bx))


def _clip_mask(x, c):
    return (np.abs(x) <= f32(c)).astype(np.float64)


def _unit_mask(x):
    return ((x >= 0) & (x <= 1)).astype(np.float64)


def _dorefa_ref(x, k):
    n = np.float32(2.0**k - 1)
    # The product in float32, as binax (and the DoReFa code) form it: 0.3·255 is 76.5 there,
    # and np.round goes half to even, like tf.round.
    return np.round(np.clip(x.astype(np.float32), 0, 1) * n).astype(np.float64) / np.float64(n)


CASES = [
    Case("sign", b.sign, (), lambda x: np_sign(x), lambda x, g: np.zeros_like(x)),
    Case(
        "ste_sign", lambda x, c: b.ste_sign(x, c), (1.0,), lambda x, c: np_sign(x),
        lambda x, g, c: g * _clip_mask(x, c), alt_sched=((0.5,), (2.0,)),
    ),
    Case(
        "ste_sign_clip0.5", lambda x, c: b.ste_sign(x, clip_value=c), (0.5,),
        lambda x, c: np_sign(x), lambda x, g, c: g * _clip_mask(x, c),
    ),
    Case(
        "ste_sign_noclip", lambda x: b.ste_sign(x, clip_value=None), (),
        lambda x: np_sign(x), lambda x, g: g,
    ),
    Case(
        "approx_sign", b.approx_sign, (), lambda x: np_sign(x),
        lambda x, g: g * np.maximum(0, 2 - 2 * np.abs(x)),
    ),
    Case(
        "swish_sign", lambda x, beta: b.swish_sign(x, beta), (5.0,), lambda x, beta: np_sign(x),
        lambda x, g, beta: g * _swish_grad(x, beta), alt_sched=((2.0,), (10.0,)),
    ),
    Case(
        "ede_sign", b.ede_sign, (0.1, 10.0), lambda x, t, k: np_sign(x),
        lambda x, g, t, k: g * f32(k) * f32(t) * (1 - np.tanh(f32(t) * x) ** 2),
        alt_sched=((1.0, 1.0), (10.0, 1.0)),
    ),
    Case(
        "ede_sign_sharp", b.ede_sign, (3.0, 1.0), lambda x, t, k: np_sign(x),
        lambda x, g, t, k: g * f32(k) * f32(t) * (1 - np.tanh(f32(t) * x) ** 2),
    ),
    Case(
        "tanh_sign", b.tanh_sign, (1.0,), lambda x, nu: np.tanh(f32(nu) * x),
        lambda x, g, nu: g * f32(nu) * (1 - np.tanh(f32(nu) * x) ** 2),
        alt_sched=((20.0,), (1000.0,)),
    ),
    Case(
        "tanh_sign_sharp", b.tanh_sign, (20.0,), lambda x, nu: np.tanh(f32(nu) * x),
        lambda x, g, nu: g * f32(nu) * (1 - np.tanh(f32(nu) * x) ** 2),
    ),
    Case(
        "ste_heaviside", lambda x, c: b.ste_heaviside(x, c), (1.0,),
        lambda x, c: (x > 0).astype(np.float64), lambda x, g, c: g * _clip_mask(x, c),
        alt_sched=((0.5,), (0.25,)),
    ),
    Case(
        "ste_heaviside_noclip", lambda x: b.ste_heaviside(x, clip_value=None), (),
        lambda x: (x > 0).astype(np.float64), lambda x, g: g,
    ),
    Case(
        "duo_binary", b.duo_binary, (), lambda x: (np.clip(x, 0, 1) >= 0.5).astype(np.float64),
        lambda x, g: g * _unit_mask(x),
    ),
    Case(
        # round(2*clip(x, 0, 1))/2 with rounding half UP.
        "duo_ternary", b.duo_ternary, (), lambda x: np.floor(2 * np.clip(x, 0, 1) + 0.5) / 2,
        lambda x, g: g * _unit_mask(x),
    ),
    Case(
        "ste_tern", lambda x, th, c: b.ste_tern(x, th, False, c), (0.05, 1.0),
        lambda x, th, c: _tern_ref(x, th), lambda x, g, th, c: g * _clip_mask(x, c),
        alt_sched=((0.25, 0.5), (0.5, 2.0)),
    ),
    Case(
        "ste_tern_th0.25_clip0.5", lambda x, th, c: b.ste_tern(x, th, clip_value=c), (0.25, 0.5),
        lambda x, th, c: _tern_ref(x, th), lambda x, g, th, c: g * _clip_mask(x, c),
    ),
    Case(
        # θ = 0: Larq's tf.sign formula gives sign(x) with 0 -> 0, not +1.
        "ste_tern_th0", lambda x: b.ste_tern(x, 0.0), (), lambda x: np.sign(x),
        lambda x, g: g * _clip_mask(x, 1.0),
    ),
    Case(
        "ste_tern_twn", lambda x, c: b.ste_tern(x, ternary_weight_networks=True, clip_value=c),
        (1.0,), lambda x, c: _tern_ref(x, 0.7 * np.mean(np.abs(x.astype(np.float32)))),
        lambda x, g, c: g * _clip_mask(x, c),
    ),
    Case(
        "ste_tern_noclip", lambda x: b.ste_tern(x, clip_value=None), (),
        lambda x: _tern_ref(x, 0.05), lambda x, g: g,
    ),
    *[
        Case(
            f"dorefa_k{k}", lambda x, k=k: b.dorefa(x, k), (), lambda x, k=k: _dorefa_ref(x, k),
            lambda x, g: g * _unit_mask(x),
        )
        for k in (1, 2, 3, 8)
    ],
]
SCHEDULED = [c for c in CASES if c.alt_sched]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_formula(case):
    out = case.fn(jnp.asarray(X), *case.sched)
    assert out.dtype == jnp.float32 and out.shape == X.shape
    np.testing.assert_allclose(np.asarray(out), case.fwd(X.astype(np.float64), *case.sched), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_backward_matches_formula(case):
    gx = vjp_x(case.fn, X, G, *case.sched)
    assert gx.dtype == np.float32
    expected = case.bwd(X.astype(np.float64), G.astype(np.float64), *case.sched)
    np.testing.assert_allclose(gx, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_jit_and_vmap_agree_with_eager(case):
    x = jnp.asarray(X)
    loss = lambda x_, *s: jnp.sum(case.fn(x_, *s) * G)
    with jax.checking_leaks():  # no tracer may escape into module state
        jitted, jitted_grad = jax.jit(case.fn)(x, *case.sched), jax.jit(jax.grad(loss))(x, *case.sched)
    # Fusion may change the last ulp of tanh/cosh, never a quantized value.
    np.testing.assert_allclose(jitted, case.fn(x, *case.sched), rtol=1e-6)
    np.testing.assert_allclose(jitted_grad, jax.grad(loss)(x, *case.sched), rtol=1e-6, atol=1e-7)
    batch = jnp.stack([x, -x, 0.5 * x])
    in_axes = (0,) + (None,) * len(case.sched)
    vmapped = jax.vmap(case.fn, in_axes=in_axes)(batch, *case.sched)
    np.testing.assert_allclose(vmapped, jnp.stack([case.fn(r, *case.sched) for r in batch]), rtol=1e-6)
    vgrad = jax.vmap(jax.grad(loss), in_axes=in_axes)(batch, *case.sched)
    np.testing.assert_allclose(
        vgrad, jnp.stack([jax.grad(loss)(r, *case.sched) for r in batch]), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bfloat16_preserved_and_matches_float32(case):
    xb = X.astype(jnp.bfloat16)
    x32 = jnp.asarray(xb.astype(np.float32))  # the same values, in float32
    out = case.fn(jnp.asarray(xb), *case.sched)
    assert out.dtype == jnp.bfloat16
    # Everything inside runs in float32 and is cast once, so the results agree exactly.
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(case.fn(x32, *case.sched).astype(jnp.bfloat16), np.float32)
    )
    gb = vjp_x(case.fn, jnp.asarray(xb), G, *case.sched)
    assert gb.dtype == jnp.bfloat16
    g32 = vjp_x(case.fn, x32, G.astype(jnp.bfloat16).astype(np.float32), *case.sched)
    np.testing.assert_allclose(gb.astype(np.float32), g32, rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("case", SCHEDULED, ids=lambda c: c.id)
def test_schedule_change_does_not_retrace(case):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(x, *sched):
        y, pullback = jax.vjp(lambda x_: case.fn(x_, *sched), x)
        return y, pullback(jnp.ones_like(y))[0]

    x = jnp.asarray(X)
    for sched in (case.sched, *case.alt_sched):
        _, gx = step(x, *[jnp.float32(v) for v in sched])
        # The traced value is really used: the gradient follows the new schedule.
        np.testing.assert_allclose(gx, case.bwd(X.astype(np.float64), np.ones(X.size), *sched), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", SCHEDULED, ids=lambda c: c.id)
def test_schedule_arguments_get_zero_cotangent(case):
    loss = lambda *sched: jnp.sum(case.fn(jnp.asarray(X), *sched) * G)
    grads = jax.grad(loss, argnums=tuple(range(len(case.sched))))(*[jnp.float32(v) for v in case.sched])
    for grad in grads:
        assert grad.dtype == jnp.float32
        assert float(grad) == 0.0


def test_sign_maps_both_zeros_to_plus_one_and_has_zero_gradient():
    x = jnp.array([-0.0, 0.0, -1e-30, 1e-30])
    np.testing.assert_array_equal(b.sign(x), [1, 1, -1, 1])
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(b.sign(v)))(x), 0.0)


def test_swish_sign_backward_is_derivative_of_its_smooth_function():
    # Cross-check of the written formula: it is d/dx [2σ(βx)(1 + βx(1 − σ(βx))) − 1], here
    # by a float64 central difference of that smooth function.
    beta, h = 5.0, 1e-6

    def smooth(x):
        s = 1 / (1 + np.exp(-beta * x))
        return 2 * s * (1 + beta * x * (1 - s)) - 1

    x64 = X.astype(np.float64)
    derivative = (smooth(x64 + h) - smooth(x64 - h)) / (2 * h)
    gx = vjp_x(b.swish_sign, X, G, beta)
    np.testing.assert_allclose(gx, G * derivative, rtol=RTOL, atol=ATOL)
    assert vjp_x(b.swish_sign, np.zeros(1, np.float32), np.ones(1, np.float32), beta)[0] == pytest.approx(beta)


def test_tanh_sign_backward_is_the_true_gradient():
    # tanh_sign is smooth: its custom backward must be the derivative of its forward.
    nu, h = 3.0, 1e-6
    x64 = X.astype(np.float64)
    derivative = (np.tanh(nu * (x64 + h)) - np.tanh(nu * (x64 - h))) / (2 * h)
    np.testing.assert_allclose(vjp_x(b.tanh_sign, X, G, nu), G * derivative, rtol=RTOL, atol=ATOL)


def test_tanh_sign_relative_is_measured_in_the_tensors_own_magnitude():
    nu = 3.0
    w = X * np.float32(0.05)  # weight-sized values
    m = np.mean(np.abs(w.astype(np.float64)))
    z = f32(nu) / m * w.astype(np.float64)
    np.testing.assert_allclose(b.tanh_sign(jnp.asarray(w), nu, relative=True), np.tanh(z), rtol=RTOL, atol=ATOL)
    # The same nu sharpens w as it sharpens w scaled to unit magnitude, and sign is unchanged.
    np.testing.assert_allclose(
        b.tanh_sign(jnp.asarray(w), nu, relative=True), b.tanh_sign(jnp.asarray(w / m), nu), rtol=1e-5, atol=1e-6
    )
    # Backward: the derivative with the scale m held constant.
    expected = G * (f32(nu) / m) / np.cosh(z) ** 2
    np.testing.assert_allclose(vjp_x(lambda x: b.tanh_sign(x, nu, relative=True), w, G), expected, rtol=RTOL, atol=ATOL)
    # An all-zero tensor keeps nu (no division by zero).
    assert np.all(np.isfinite(vjp_x(lambda x: b.tanh_sign(x, nu, relative=True), np.zeros(4, np.float32), G[:4])))
    fn = b.resolve("tanh_sign", relative=True, nu_max=50.0)
    np.testing.assert_allclose(fn(jnp.asarray(w), 1.0), np.tanh(50.0 / m * w.astype(np.float64)), rtol=RTOL, atol=ATOL)


def test_duo_ternary_rounds_half_up_and_decouples_into_two_binaries():
    x = jnp.array([0.25, 0.75, -0.0, 1.0], jnp.float32)
    np.testing.assert_array_equal(b.duo_ternary(x), [0.5, 1.0, 0.0, 1.0])
    # jnp.round would send 0.25 to 0 (half to even): the reason for the explicit form.
    assert float(jnp.round(2 * x[0]) / 2) == 0.0
    # BinaryDuo decoupling: ternary(y) = ½·1[y + ¼ ≥ ½] + ½·1[y − ¼ ≥ ½], exactly.
    grid = jnp.arange(-8, 41, dtype=jnp.float32) / 32  # dyadic, so y ± ¼ is exact
    decoupled = 0.5 * b.duo_binary(grid + 0.25) + 0.5 * b.duo_binary(grid - 0.25)
    np.testing.assert_array_equal(b.duo_ternary(grid), decoupled)


def test_ste_tern_boundaries_and_twn_threshold():
    th = 0.25
    x = jnp.array([-th, -0.0, 0.0, th, np.nextafter(np.float32(th), 0)], jnp.float32)
    np.testing.assert_array_equal(b.ste_tern(x, th), [-1, 0, 0, 1, 0])
    # TWN: θ = 0.7·mean|x| = 0.7·0.6375 ≈ 0.446 here: ±0.3 and 0 → 0, ±0.5 and beyond → ±1.
    x = jnp.array([-0.7, 0.6, 0.7, 1.7, -0.3, 0.0, -0.6, 0.5], jnp.float32)
    expected = [-1, 1, 1, 1, 0, 0, -1, 1]
    np.testing.assert_array_equal(b.ste_tern(x, ternary_weight_networks=True), expected)
    # θ scales with the tensor (a fixed θ = 0.05 would send ±0.3 to ±1).
    np.testing.assert_array_equal(b.ste_tern(4 * x, ternary_weight_networks=True), expected)
    # An all-zero tensor has θ = 0 and stays zero (Larq), rather than becoming all +1.
    np.testing.assert_array_equal(b.ste_tern(jnp.zeros(4), ternary_weight_networks=True), 0.0)


def test_dorefa_levels_and_boundaries():
    x = jnp.linspace(-0.5, 1.5, 201)
    for k in (1, 2, 3):
        levels = np.unique(np.asarray(b.dorefa(x, k)))
        np.testing.assert_allclose(levels, np.arange(2**k) / (2**k - 1), rtol=1e-6)
    np.testing.assert_array_equal(b.dorefa(jnp.array([0.0, 1.0, 0.5]), 1), [0.0, 1.0, 0.0])
    assert b.dorefa(jnp.ones(2), np.int64(2)).shape == (2,)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2", None])
def test_dorefa_rejects_bad_k_bit(bad):
    with pytest.raises(ValueError, match="k_bit.*" + re.escape(repr(bad))):
        b.dorefa(jnp.ones(3), bad)


# ---------------------------------------------------------------------- schedules


def test_ede_params_endpoints_and_middle():
    t, k = b.ede_params(0.0)
    assert (float(t), float(k)) == pytest.approx((0.1, 10.0), rel=1e-6)
    t, k = b.ede_params(1.0)
    assert (float(t), float(k)) == pytest.approx((10.0, 1.0), rel=1e-6)
    for p in (0.25, 0.5, 0.8):
        t, k = b.ede_params(p)
        expected_t = 10 ** (np.log10(0.1) + (np.log10(10.0) - np.log10(0.1)) * p)
        assert float(t) == pytest.approx(expected_t, rel=1e-6)
        assert float(k) == pytest.approx(max(1 / expected_t, 1.0), rel=1e-6)
    t, k = b.ede_params(0.0, t_min=1e-3)  # ResNet-20 1w1a
    assert (float(t), float(k)) == pytest.approx((1e-3, 1e3), rel=1e-5)
    assert t.dtype == k.dtype == jnp.float32
    with pytest.raises(ValueError, match="t_min"):
        b.ede_params(0.5, t_min=0.0)


def test_ede_params_is_jittable_in_progress():
    chex.clear_trace_counter()
    sched = jax.jit(chex.assert_max_traces(b.ede_params, n=1))
    for p in np.linspace(0, 1, 4, dtype=np.float32):
        np.testing.assert_allclose(sched(p), b.ede_params(float(p)), rtol=1e-6)


def test_nu_schedule_endpoints_and_middle():
    assert float(b.nu_schedule(0.0, nu_0=2.0, nu_max=50.0)) == pytest.approx(2.0, rel=1e-6)
    assert float(b.nu_schedule(1.0, nu_0=2.0, nu_max=50.0)) == pytest.approx(50.0, rel=1e-6)
    assert float(b.nu_schedule(0.5, nu_0=2.0, nu_max=50.0)) == pytest.approx(10.0, rel=1e-6)
    assert float(b.nu_schedule(0.3)) == pytest.approx(1000.0**0.3, rel=1e-6)
    with pytest.raises(ValueError, match="nu_0"):
        b.nu_schedule(0.5, nu_0=-1.0)


def test_nu_schedule_held_until_start_then_geometric():
    # nu = nu_0 until progress = start, then nu_0 * (nu_max/nu_0) ** ((p - start) / (1 - start)).
    for p in (0.0, 0.5, 0.8):
        assert float(b.nu_schedule(p, nu_0=2.0, nu_max=1e9, start=0.8)) == pytest.approx(2.0, rel=1e-6)
    assert float(b.nu_schedule(0.9, nu_0=2.0, nu_max=50.0, start=0.8)) == pytest.approx(10.0, rel=1e-5)
    assert float(b.nu_schedule(1.0, nu_0=1.0, nu_max=1e9, start=0.9)) == pytest.approx(1e9, rel=1e-5)
    # start is a static keyword, progress stays traced: one trace over the whole schedule.
    chex.clear_trace_counter()
    sched = jax.jit(chex.assert_max_traces(lambda q: b.nu_schedule(q, nu_max=1e9, start=0.9), n=1))
    for p in (0.0, 0.95, 1.0):
        assert float(sched(jnp.float32(p))) == pytest.approx(float(b.nu_schedule(p, nu_max=1e9, start=0.9)), rel=1e-6)
    with pytest.raises(ValueError, match=r"start=1\.0"):
        b.nu_schedule(0.5, start=1.0)


def test_nu_schedule_two_geometric_ramps_through_nu_start():
    # nu_0 -> nu_start over [0, start], nu_start -> nu_max over [start, 1], log-linear.
    kw = dict(nu_0=1.0, nu_start=16.0, nu_max=1e8, start=0.8)
    expected = {0.0: 1.0, 0.2: 2.0, 0.4: 4.0, 0.8: 16.0, 0.9: 4e4, 1.0: 1e8}
    for p, nu in expected.items():
        assert float(b.nu_schedule(p, **kw)) == pytest.approx(nu, rel=1e-5), p
    chex.clear_trace_counter()
    sched = jax.jit(chex.assert_max_traces(lambda q: b.nu_schedule(q, **kw), n=1))
    for p, nu in expected.items():
        assert float(sched(jnp.float32(p))) == pytest.approx(nu, rel=1e-5)
    assert float(b.resolve("tanh_sign", **kw)(jnp.float32(0.5), 0.4)) == pytest.approx(np.tanh(2.0), rel=1e-6)
    with pytest.raises(ValueError, match="nu_start=-1"):
        b.nu_schedule(0.5, nu_start=-1.0, start=0.5)


# --------------------------------------------------------------- weight binarizers

_RNG = np.random.default_rng(0)
KERNEL = _RNG.standard_normal((3, 3, 4, 5)).astype(np.float32)
KERNEL[0, 0, 0, :] = 0.0  # exact zeros: sign(0) = +1
G_KERNEL = _RNG.standard_normal(KERNEL.shape).astype(np.float32)
AXES = (0, 1, 2)


def test_xnor_weight_forward_and_backward():
    alpha = np.mean(np.abs(KERNEL), axis=AXES, keepdims=True)
    np.testing.assert_allclose(b.xnor_weight(jnp.asarray(KERNEL)), alpha * np_sign(KERNEL), rtol=1e-6)
    np.testing.assert_allclose(vjp_x(b.xnor_weight, KERNEL, G_KERNEL), G_KERNEL * alpha, rtol=1e-6)
    dense = KERNEL.reshape(-1, 5)
    np.testing.assert_allclose(
        b.xnor_weight(jnp.asarray(dense)), np.mean(np.abs(dense), 0) * np_sign(dense), rtol=1e-6
    )


def test_duo_weight_forward_and_backward():
    alpha = np.mean(np.abs(KERNEL))  # ONE scale for the whole layer
    np.testing.assert_allclose(b.duo_weight(jnp.asarray(KERNEL)), alpha * np_sign(KERNEL), rtol=1e-6)
    # The official code hands dL/dW_Q to the latent weights unchanged (not times alpha).
    np.testing.assert_array_equal(vjp_x(b.duo_weight, KERNEL, G_KERNEL), G_KERNEL)


def _libra_forward_np(w, t, k):
    w = w.astype(np.float64)
    axes = tuple(range(w.ndim - 1))
    w_hat = (w - w.mean(axes, keepdims=True)) / w.std(axes, ddof=1, keepdims=True)
    s = 2.0 ** np.round(np.log2(np.mean(np.abs(w_hat), axes, keepdims=True)))
    return np_sign(w_hat) * s, s


def _libra_reference(w, w_np, t, k):
    """Autodiff reference: JAX differentiates the ddof=1 standardization of ``w``; the EDE
    derivative ``k·t·(1 − tanh²(t ŵ))`` enters as a float64 constant (computed from
    ``w_np``, the same values) through a stop-gradient trick."""
    axes = tuple(range(w.ndim - 1))
    w_hat = (w - jnp.mean(w, axes, keepdims=True)) / jnp.std(w, axes, keepdims=True, ddof=1)
    s = jax.lax.stop_gradient(2.0 ** jnp.round(jnp.log2(jnp.mean(jnp.abs(w_hat), axes, keepdims=True))))
    w64 = np.asarray(w_np, np.float64)
    w_hat64 = (w64 - w64.mean(axes, keepdims=True)) / w64.std(axes, ddof=1, keepdims=True)
    ede = jnp.asarray(k * t * (1 - np.tanh(t * w_hat64) ** 2), jnp.float32)
    sg = jax.lax.stop_gradient
    # Forward sign(ŵ); derivative w.r.t. ŵ exactly `ede`.
    return (sg(jnp.where(w_hat >= 0, 1.0, -1.0)) + (w_hat - sg(w_hat)) * ede) * s


@pytest.mark.parametrize("t,k", [(0.1, 10.0), (1.0, 1.0), (10.0, 1.0)])
def test_libra_pb_forward_and_backward(t, k):
    w = jnp.asarray(KERNEL)
    expected, _ = _libra_forward_np(KERNEL, t, k)
    np.testing.assert_array_equal(b.libra_pb(w, t, k), expected)
    got = vjp_x(b.libra_pb, KERNEL, G_KERNEL, t, k)
    _, pullback = jax.vjp(lambda v: _libra_reference(v, KERNEL, t, k), jnp.asarray(KERNEL))
    np.testing.assert_allclose(got, pullback(jnp.asarray(G_KERNEL))[0], rtol=RTOL, atol=ATOL)


def test_libra_pb_exact_zero_and_power_of_two_scale():
    # Channel 0 standardizes to exactly (−1, 0, 1)·c: the 0 maps to +s.
    w = np.array([[-3.0, 1.0], [0.0, 2.0], [3.0, 7.0]], np.float32)
    out = np.asarray(b.libra_pb(jnp.asarray(w), 1.0, 1.0))
    expected, s = _libra_forward_np(w, 1.0, 1.0)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[:, 0], [-s[0, 0], s[0, 0], s[0, 0]])
    assert np.all(np.log2(s) == np.round(np.log2(s)))


def test_libra_pb_gradient_flows_through_the_standardization():
    t, k = 1.0, 1.0
    gw = vjp_x(b.libra_pb, KERNEL, G_KERNEL, t, k)
    # ŵ is invariant to w → a·w + c per channel, so the gradient is orthogonal to both
    # directions in each channel; a per-element EDE (mean and std held fixed) is not.
    scale = np.abs(gw).sum(AXES)
    np.testing.assert_allclose(gw.sum(AXES) / scale, 0.0, atol=1e-5)
    np.testing.assert_allclose((gw * KERNEL).sum(AXES) / scale, 0.0, atol=1e-5)
    w64 = KERNEL.astype(np.float64)
    std = w64.std(AXES, ddof=1, keepdims=True)
    w_hat = (w64 - w64.mean(AXES, keepdims=True)) / std
    _, s = _libra_forward_np(KERNEL, t, k)
    per_element = G_KERNEL * s * k * t * (1 - np.tanh(t * w_hat) ** 2) / std
    assert np.abs(per_element.sum(AXES)).max() > 1e-2  # the naive estimate is not centred
    assert np.abs(gw - per_element).max() > 1e-2


def test_libra_pb_constant_channel_is_zero_with_finite_gradient():
    # The official code divides 0 by 0 here; binax maps a constant channel to 0.
    w = jnp.asarray(KERNEL).at[..., 1].set(0.5)
    out = b.libra_pb(w, 1.0, 1.0)
    np.testing.assert_array_equal(out[..., 1], 0.0)
    np.testing.assert_array_equal(out[..., 0], b.libra_pb(jnp.asarray(KERNEL), 1.0, 1.0)[..., 0])
    gw = jax.grad(lambda v: jnp.sum(b.libra_pb(v, 1.0, 1.0) * G_KERNEL))(w)
    assert np.all(np.isfinite(gw))


def test_libra_pb_schedule_is_traced_with_zero_cotangent():
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(w, t, k):
        loss = lambda w_, t_, k_: jnp.sum(b.libra_pb(w_, t_, k_) * G_KERNEL)
        return jax.grad(loss, argnums=(0, 1, 2))(w, t, k)

    for t, k in [(0.1, 10.0), (1.0, 1.0), (10.0, 1.0)]:
        gw, gt, gk = grads(jnp.asarray(KERNEL), jnp.float32(t), jnp.float32(k))
        assert float(gt) == 0.0 and float(gk) == 0.0
        np.testing.assert_allclose(gw, vjp_x(b.libra_pb, KERNEL, G_KERNEL, t, k), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [b.xnor_weight, b.libra_pb, b.duo_weight, b.abc_weight], ids=lambda f: f.__name__)
def test_weight_binarizers_jit_vmap_bfloat16(fn):
    extra = {b.libra_pb: (0.5, 2.0), b.abc_weight: (3,)}.get(fn, ())
    call = lambda w: fn(w, *extra)
    w = jnp.asarray(KERNEL)
    np.testing.assert_allclose(jax.jit(call)(w), call(w), rtol=1e-6)
    batch = jnp.stack([w, 2 * w + 0.1])
    np.testing.assert_allclose(jax.vmap(call)(batch), jnp.stack([call(v) for v in batch]), rtol=1e-6)
    vgrad = jax.vmap(jax.grad(lambda v: jnp.sum(call(v) * G_KERNEL)))(batch)
    np.testing.assert_allclose(
        vgrad, jnp.stack([jax.grad(lambda v: jnp.sum(call(v) * G_KERNEL))(v) for v in batch]), rtol=1e-5, atol=1e-6
    )
    wb = w.astype(jnp.bfloat16)
    out = call(wb)
    assert out.dtype == jnp.bfloat16
    # Statistics run in float32 and the result is cast once: equal to float32 on the same values.
    np.testing.assert_array_equal(
        np.asarray(out, np.float32), np.asarray(call(wb.astype(jnp.float32)).astype(jnp.bfloat16), np.float32)
    )
    assert vjp_x(call, wb, G_KERNEL).dtype == jnp.bfloat16


@pytest.mark.parametrize("fn", [b.xnor_weight, lambda w: b.libra_pb(w, 1.0, 1.0)], ids=["xnor_weight", "libra_pb"])
@pytest.mark.parametrize("shape", [(), (5,)])
def test_per_channel_weight_binarizers_reject_rank_below_two(fn, shape):
    with pytest.raises(ValueError, match="rank >= 2.*" + re.escape(repr(shape))):
        fn(jnp.ones(shape))


# ------------------------------------------------------------------------ ABC-Net


def _abc_u(m):
    # u_i = −1 + 2(i − 1)/(M − 1), i = 1..M; u = 0 for M = 1.
    return [0.0] if m == 1 else [-1 + 2 * (i - 1) / (m - 1) for i in range(1, m + 1)]


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_abc_weight_bases_shifts_and_least_squares(m):
    w = KERNEL
    bases, alphas = b.abc_weight_bases(jnp.asarray(w), m)
    assert bases.shape == (m, *w.shape) and alphas.shape == (m,)
    assert bases.dtype == alphas.dtype == jnp.float32
    mean, std = w.mean(dtype=np.float64), w.std(dtype=np.float64)  # layer-wise, population std
    for i, u in enumerate(_abc_u(m)):
        np.testing.assert_array_equal(bases[i], np_sign(w - mean + u * std), err_msg=f"base {i}, u={u}")
    design = np.asarray(bases, np.float64).reshape(m, -1).T
    target = w.reshape(-1).astype(np.float64)
    np.testing.assert_allclose(alphas, np.linalg.lstsq(design, target, rcond=None)[0], rtol=1e-4, atol=1e-6)

    def residual(a):
        return np.sum((target - design @ a) ** 2)

    best = residual(np.asarray(alphas, np.float64))
    rng = np.random.default_rng(m)
    for scale in (1e-1, 1e-3):
        for _ in range(20):
            assert residual(np.asarray(alphas, np.float64) + scale * rng.standard_normal(m)) >= best * (1 - 1e-6)


def test_abc_weight_bases_no_gradient_jit_vmap():
    loss = lambda w: jnp.sum(b.abc_weight_bases(w, 3)[1]) + jnp.sum(b.abc_weight_bases(w, 3)[0] * G_KERNEL)
    np.testing.assert_array_equal(jax.grad(loss)(jnp.asarray(KERNEL)), 0.0)
    jitted = jax.jit(b.abc_weight_bases, static_argnums=1)
    for got, want in zip(jitted(jnp.asarray(KERNEL), 3), b.abc_weight_bases(jnp.asarray(KERNEL), 3)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    batch = jnp.stack([KERNEL, KERNEL**3])
    vb, va = jax.vmap(lambda w: b.abc_weight_bases(w, 3))(batch)
    for i in range(2):
        wb, wa = b.abc_weight_bases(batch[i], 3)
        np.testing.assert_array_equal(vb[i], wb)
        np.testing.assert_allclose(va[i], wa, rtol=1e-5)


@pytest.mark.parametrize("m", [1, 3])
def test_abc_weight_forward_and_ste_backward(m):
    bases, alphas = b.abc_weight_bases(jnp.asarray(KERNEL), m)
    bases, alphas = np.asarray(bases, np.float64), np.asarray(alphas, np.float64)
    np.testing.assert_allclose(b.abc_weight(jnp.asarray(KERNEL), m), np.tensordot(alphas, bases, 1), rtol=1e-5, atol=1e-6)
    # ∂c/∂W = Σ_i α_i ∂c/∂B_i, each ∂c/∂B_i being the cotangent of the combined kernel.
    gw = vjp_x(b.abc_weight, KERNEL, G_KERNEL, m)
    np.testing.assert_allclose(gw, sum(a * G_KERNEL for a in alphas), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [b.abc_weight, b.abc_weight_bases], ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_abc_rejects_bad_m(fn, bad):
    with pytest.raises(ValueError, match="m .*" + re.escape(repr(bad))):
        fn(jnp.asarray(KERNEL), bad)


def test_abc_activation_forward_and_backward():
    shifts = np.array([0.0, 0.25, -0.5], np.float32)
    betas = np.array([1.0, 0.5, -0.25], np.float32)
    x = X.astype(np.float64)

    def h(v):  # H_v(x) = 2·1[clip(x + v, 0, 1) ≥ 0.5] − 1
        return 2.0 * (np.clip(x + v, 0, 1) >= 0.5) - 1

    out = b.abc_activation(jnp.asarray(X), jnp.asarray(shifts), jnp.asarray(betas))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, sum(bt * h(v) for v, bt in zip(shifts, betas)))

    _, pullback = jax.vjp(b.abc_activation, jnp.asarray(X), jnp.asarray(shifts), jnp.asarray(betas))
    gx, gv, gb = pullback(jnp.asarray(G))
    # STE through the clip: dH_v/dx = 2·1[0 ≤ x + v ≤ 1].
    dh = [2.0 * ((x + v >= 0) & (x + v <= 1)) for v in shifts]
    np.testing.assert_allclose(gx, sum(bt * d * G for bt, d in zip(betas, dh)), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gv, [np.sum(bt * d * G) for bt, d in zip(betas, dh)], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gb, [np.sum(h(v) * G) for v in shifts], rtol=1e-6, atol=1e-6)


def test_abc_activation_jit_vmap_bfloat16_and_bad_shapes():
    shifts, betas = jnp.array([0.0, 0.25]), jnp.array([1.0, 0.5])
    x = jnp.asarray(X)
    np.testing.assert_array_equal(jax.jit(b.abc_activation)(x, shifts, betas), b.abc_activation(x, shifts, betas))
    batch = jnp.stack([x, -x])
    np.testing.assert_array_equal(
        jax.vmap(b.abc_activation, in_axes=(0, None, None))(batch, shifts, betas),
        jnp.stack([b.abc_activation(r, shifts, betas) for r in batch]),
    )
    xb = x.astype(jnp.bfloat16)
    out = b.abc_activation(xb, shifts, betas)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, b.abc_activation(xb.astype(jnp.float32), shifts, betas).astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        b.abc_activation(x, shifts, jnp.ones(3))


# ---------------------------------------------------------------- registry, resolve


def test_get_returns_registered_functions():
    assert b.get("ede_sign") is b.ede_sign
    assert b.get("libra_pb") is b.libra_pb
    assert set(b.names()) >= {
        "sign", "ste_sign", "approx_sign", "swish_sign", "ede_sign", "tanh_sign", "ste_heaviside",
        "duo_ternary", "ste_tern", "dorefa", "xnor_weight", "libra_pb", "abc_weight", "duo_weight",
    }


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="ede_sgn") as info:
        b.get("ede_sgn")
    for name in b.names():
        assert name in str(info.value)


REQUIRED = {"abc_weight": {"m": 2}}


@pytest.mark.parametrize("name", b.names())
def test_every_registered_name_resolves_and_preserves_shape_and_dtype(name):
    fn = b.resolve(name, **REQUIRED.get(name, {}))
    for dtype in (jnp.float32, jnp.bfloat16):
        w = jnp.asarray(KERNEL[0, 0], dtype)
        out = fn(w, 0.5)
        assert out.shape == w.shape and out.dtype == dtype


def test_resolve_none_is_none():
    assert b.resolve(None) is None


def test_resolve_ede_sign_follows_progress_without_retracing():
    fn = b.resolve("ede_sign", t_min=1e-3)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad_at(x, progress):
        return jax.grad(lambda v: jnp.sum(fn(v, progress) * G))(x)

    for p in np.linspace(0.0, 1.0, 5, dtype=np.float32):
        t, k = b.ede_params(float(p), t_min=1e-3)
        # progress only sets t and k: it gets no gradient of its own.
        assert float(jax.grad(lambda q: jnp.sum(fn(jnp.asarray(X), q) * G))(p)) == 0.0
        expected = G * float(k) * float(t) * (1 - np.tanh(float(t) * X.astype(np.float64)) ** 2)
        np.testing.assert_allclose(grad_at(jnp.asarray(X), p), expected, rtol=RTOL, atol=ATOL)


def test_resolve_schedules_match_direct_calls():
    x = jnp.asarray(X)
    for p in (0.0, 0.3, 1.0):
        fn = b.resolve("tanh_sign", nu_0=2.0, nu_max=50.0)
        np.testing.assert_array_equal(fn(x, p), b.tanh_sign(x, b.nu_schedule(p, nu_0=2.0, nu_max=50.0)))
        t, k = b.ede_params(p, t_min=0.01, t_max=5.0)
        w = jnp.asarray(KERNEL)
        got = jax.grad(lambda v: jnp.sum(b.resolve("libra_pb", t_min=0.01, t_max=5.0)(v, p) * G_KERNEL))(w)
        want = jax.grad(lambda v: jnp.sum(b.libra_pb(v, t, k) * G_KERNEL))(w)
        np.testing.assert_array_equal(got, want)
    fn = b.resolve("ste_sign", clip_value=0.5)
    np.testing.assert_array_equal(vjp_x(fn, X, G, 0.7), G * _clip_mask(X, 0.5))
    np.testing.assert_array_equal(b.resolve("dorefa", k_bit=3)(x), b.dorefa(x, 3))


def test_resolve_rejects_unknown_and_schedule_computed_keywords():
    with pytest.raises(ValueError, match=r"\['clip'\].*ede_sign.*t_max"):
        b.resolve("ede_sign", clip=1.0)
    with pytest.raises(ValueError, match=r"\['t'\]"):
        b.resolve("ede_sign", t=1.0)
    with pytest.raises(ValueError, match=r"\['nu_min'\].*nu_max"):
        b.resolve("tanh_sign", nu_min=1.0)
    with pytest.raises(ValueError, match=r"abc_weight.*\['m'\]"):
        b.resolve("abc_weight")
    with pytest.raises(ValueError, match="valid names"):
        b.resolve("no_such_binarizer")


def test_resolve_callable_specs():
    x = jnp.asarray(X)
    scaled = b.resolve(lambda v, factor: v * factor, factor=3.0)
    np.testing.assert_array_equal(scaled(x, 0.2), x * 3.0)
    with_progress = b.resolve(lambda v, progress, offset: v * progress + offset, offset=1.0)
    np.testing.assert_allclose(with_progress(x, 0.25), x * 0.25 + 1.0)
    # A registered function passed as itself keeps its schedule.
    by_object, by_name = b.resolve(b.ede_sign), b.resolve("ede_sign")
    grad = lambda f: jax.grad(lambda v: jnp.sum(f(v, 0.4) * G))(x)
    np.testing.assert_array_equal(grad(by_object), grad(by_name))
