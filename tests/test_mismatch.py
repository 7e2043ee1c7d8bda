"""binax.mismatch: the smoothed-loss gradient against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from binax import binarizers, mismatch


def _linear_sign_problem(d=6, terms=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(terms, d)).astype(np.float32)
    b = rng.normal(size=(terms,)).astype(np.float32) * 0.3
    c = rng.normal(size=(terms,)).astype(np.float32)
    theta = rng.normal(size=(d,)).astype(np.float32) * 0.2
    return a, b, c, theta


def _loss(a, b, c):
    # L(θ) = Σ_j c_j sign(a_j·θ + b_j): piecewise constant, zero gradient almost everywhere.
    return lambda theta: jnp.sum(c * binarizers.sign(a @ theta + b))


def _closed_form_grad(a, b, c, theta, sigma):
    # E sign(a·θ + b + σ a·ε) = 2Φ(z) − 1 with z = (a·θ + b)/(σ|a|), so
    # ∇L_σ = Σ_j c_j · 2φ(z_j)/(σ|a_j|) · a_j.
    an = np.linalg.norm(a, axis=1)
    z = (a @ theta + b) / (sigma * an)
    return ((c * 2 * norm.pdf(z) / (sigma * an))[:, None] * a).sum(0)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_smoothed_grad_matches_closed_form_within_stderr(sigma):
    a, b, c, theta = _linear_sign_problem()
    est = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(1), sigma,
                                 num_samples=4096, chunk_size=256, num_groups=8)
    exact = _closed_form_grad(a, b, c, theta, sigma)
    z = (np.asarray(est.grad) - exact) / np.asarray(est.stderr)
    # Deterministic seed; 4 standard errors per coordinate.
    assert np.all(np.abs(z) < 4.0), z
    # The estimate is informative, not just noisy: it points along the true gradient.
    assert float(mismatch.cosine(est.grad, exact)) > 0.95
    assert est.num_samples == 4096


def test_smoothed_grad_stderr_shrinks_with_samples():
    a, b, c, theta = _linear_sign_problem()
    small = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(2), 0.3,
                                   num_samples=256, chunk_size=32)
    big = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(2), 0.3,
                                 num_samples=4096, chunk_size=256)
    ratio = np.asarray(small.stderr) / np.asarray(big.stderr)
    assert np.all((ratio > 2.5) & (ratio < 6.0)), ratio  # sqrt(16) = 4


def test_smoothed_grad_works_on_pytrees_and_groups_average_to_mean():
    params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros((2,))}
    loss = lambda p: jnp.sum(binarizers.sign(jnp.ones(3) @ p["w"] + p["b"]))
    est = mismatch.smoothed_grad(loss, params, jax.random.key(0), 0.2, num_samples=64, chunk_size=8, num_groups=4)
    assert jax.tree.map(jnp.shape, est.grad) == {"w": (3, 2), "b": (2,)}
    assert est.group_grads["w"].shape == (4, 3, 2)
    np.testing.assert_allclose(jnp.mean(est.group_grads["w"], 0), est.grad["w"], rtol=1e-5, atol=1e-6)


def test_coordinate_discrete_grad_on_a_single_sign():
    # L(θ) = Σ_i c_i sign(θ_i): stepping θ_i by ±(|θ_i| + m) flips exactly one side, so
    # g_i = c_i (sign(θ_i + h) − sign(θ_i − h)) / (2h) = c_i / (|θ_i| + m).
    theta = jnp.array([0.3, -0.2, 0.05, -0.7])
    c = jnp.array([1.0, -2.0, 0.5, 3.0])
    loss = lambda t: jnp.sum(c * binarizers.sign(t))
    cdg, mask = mismatch.coordinate_discrete_grad(loss, theta, jax.random.key(0), num_coords=4, margin=1e-2)
    np.testing.assert_allclose(cdg, c / (jnp.abs(theta) + 1e-2), rtol=1e-5)
    np.testing.assert_array_equal(mask, jnp.ones(4))


def test_cosine_with_ci_brackets_the_value():
    a, b, c, theta = _linear_sign_problem()
    est = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(3), 0.3,
                                 num_samples=512, chunk_size=64, num_groups=8)
    exact = _closed_form_grad(a, b, c, theta, 0.3)
    sim = mismatch.cosine_with_ci(jnp.asarray(exact), est)
    assert sim.low <= sim.value <= sim.high
    assert sim.value > 0.8
    # An orthogonal direction has cosine ≈ 0.
    assert abs(float(mismatch.cosine(jnp.array([1.0, 0]), jnp.array([0, 2.0])))) < 1e-7


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma"):
        mismatch.smoothed_grad(lambda p: jnp.sum(p), jnp.ones(2), jax.random.key(0), 0.0)
