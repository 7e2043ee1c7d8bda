"""Gradient mismatch: how far a binarizer's backward estimator is from a true descent direction.

The loss of a quantized network is piecewise constant in its latent weights and in the
pre-activations of its binary activations, so its true gradient is zero almost
everywhere. BinaryDuo (Kim et al., ICLR 2020) measures an estimator against the gradient of
the *smoothed* loss

    L_σ(θ) = E_{ε ~ N(0, I)} L(θ + σ ε),

whose gradient exists and is estimated by Monte-Carlo with antithetic pairs

    ∇L_σ(θ) ≈ 1/N Σ_i ε_i (L(θ + σ ε_i) − L(θ − σ ε_i)) / (2σ).

The metric is the cosine similarity, per layer, between an estimator's gradient and the
smoothed gradient, as a function of σ. This module works for ANY binarizer and any loss: it
only needs ``loss_fn(params) -> scalar`` (weight smoothing) or a loss of an additive
perturbation of one layer's input (activation smoothing, see ``input_perturbation``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ------------------------------------------------------------------ smoothed gradient


@dataclasses.dataclass(frozen=True)
class SmoothedGradient:
    """A Monte-Carlo estimate of ∇L_σ.

    ``grad``: the mean over all antithetic pairs. ``stderr``: per-coordinate standard
    error of that mean. ``group_grads``: the mean within each of ``num_groups`` disjoint
    groups of pairs (leading axis), used for jackknife confidence intervals of derived
    statistics such as cosine similarity.
    """

    grad: PyTree
    stderr: PyTree
    group_grads: PyTree
    sigma: float
    num_samples: int


def _tree_normal(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, l.shape, jnp.float32) for k, l in zip(keys, leaves)]
    )


def smoothed_grad(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    sigma: float,
    num_samples: int = 256,
    chunk_size: int = 32,
    num_groups: int = 8,
) -> SmoothedGradient:
    """Antithetic Monte-Carlo gradient of the Gaussian-smoothed loss ``E L(θ + σε)``.

    Each sample is ``ε (L(θ + σε) − L(θ − σε)) / (2σ)``; samples are evaluated ``chunk_size``
    at a time with ``vmap`` (bounding memory to ``chunk_size`` copies of θ) and accumulated
    with ``lax.scan`` into per-group sums and a sum of squares. ``num_samples`` is rounded
    up so that whole chunks split evenly over ``num_groups`` groups; the count used is
    returned as ``num_samples``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}.")
    if num_samples < 2 or chunk_size < 1 or num_groups < 2:
        raise ValueError(
            f"need num_samples >= 2, chunk_size >= 1, num_groups >= 2; got "
            f"{num_samples}, {chunk_size}, {num_groups}."
        )
    num_chunks = max(num_groups, math.ceil(num_samples / chunk_size))
    num_chunks = math.ceil(num_chunks / num_groups) * num_groups
    n = num_chunks * chunk_size
    params32 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)

    def one_sample(k):
        eps = _tree_normal(k, params32)
        plus = jax.tree.map(lambda p, e: p + sigma * e, params32, eps)
        minus = jax.tree.map(lambda p, e: p - sigma * e, params32, eps)
        diff = (loss_fn(plus) - loss_fn(minus)) / (2.0 * sigma)
        return jax.tree.map(lambda e: e * diff, eps)

    zeros = jax.tree.map(jnp.zeros_like, params32)
    group_zeros = jax.tree.map(lambda z: jnp.zeros((num_groups,) + z.shape, z.dtype), params32)

    def body(carry, inputs):
        sums, sq = carry
        chunk_idx, chunk_keys = inputs
        samples = jax.vmap(one_sample)(chunk_keys)
        group = chunk_idx % num_groups
        sums = jax.tree.map(lambda s, x: s.at[group].add(jnp.sum(x, 0)), sums, samples)
        sq = jax.tree.map(lambda s, x: s + jnp.sum(x * x, 0), sq, samples)
        return (sums, sq), None

    keys = jax.random.split(key, n)
    keys = keys.reshape((num_chunks, chunk_size) + keys.shape[1:])  # typed or raw uint32 keys
    (sums, sq), _ = jax.lax.scan(body, (group_zeros, zeros), (jnp.arange(num_chunks), keys))
    total = jax.tree.map(lambda s: jnp.sum(s, 0), sums)
    mean = jax.tree.map(lambda t: t / n, total)
    var = jax.tree.map(lambda s, m: jnp.maximum(s / n - m * m, 0.0) * n / (n - 1), sq, mean)
    stderr = jax.tree.map(lambda v: jnp.sqrt(v / n), var)
    per_group = n // num_groups
    group_grads = jax.tree.map(lambda s: s / per_group, sums)
    return SmoothedGradient(mean, stderr, group_grads, float(sigma), n)


# ------------------------------------------------------- coordinate discrete gradient


def coordinate_discrete_grad(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    num_coords: int = 64,
    margin: float = 1e-3,
    threshold: float = 0.0,
) -> tuple[PyTree, PyTree]:
    """Coordinate discrete gradient on a random subset of coordinates.

    For a sampled coordinate j with value θ_j, the step ``h = |θ_j − threshold| + margin``
    is just large enough that one of ``θ_j ± h`` lies on the other side of the quantizer's
    threshold, so the quantized value flips on exactly one side:

        g_j = (L(θ + h e_j) − L(θ − h e_j)) / (2h).

    Returns ``(cdg, mask)``: trees shaped like ``params`` holding g_j at the sampled
    coordinates (``num_coords`` per leaf, or all of a smaller leaf) and 0 elsewhere, and
    the 0/1 mask of sampled coordinates. Compare an estimator against it on the mask only.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    cdg_leaves, mask_leaves = [], []
    for li, (leaf, k) in enumerate(zip(leaves, keys)):
        flat = jnp.ravel(leaf).astype(jnp.float32)
        count = min(num_coords, flat.size)
        idx = jax.random.choice(k, flat.size, (count,), replace=False)

        def loss_at(i, delta, li=li):
            new = [
                (jnp.ravel(l).astype(jnp.float32).at[i].add(delta).reshape(l.shape) if j == li else l)
                for j, l in enumerate(leaves)
            ]
            return loss_fn(jax.tree.unflatten(treedef, new))

        def one(i):
            h = jnp.abs(flat[i] - threshold) + margin
            return (loss_at(i, h) - loss_at(i, -h)) / (2 * h)

        values = jax.lax.map(one, idx)
        cdg_leaves.append(jnp.zeros_like(flat).at[idx].set(values).reshape(leaf.shape))
        mask_leaves.append(jnp.zeros_like(flat).at[idx].set(1.0).reshape(leaf.shape))
    return jax.tree.unflatten(treedef, cdg_leaves), jax.tree.unflatten(treedef, mask_leaves)


# ------------------------------------------------------------------- cosine similarity


def cosine(a: jax.Array, b: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``<a, b> / (|a| |b|)`` over all elements (optionally only where ``mask`` is 1)."""
    a = jnp.ravel(a).astype(jnp.float32)
    b = jnp.ravel(b).astype(jnp.float32)
    if mask is not None:
        m = jnp.ravel(mask).astype(jnp.float32)
        a, b = a * m, b * m
    denom = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(denom > 0, jnp.dot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class Similarity:
    """Cosine similarity with a jackknife 95% confidence interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _jackknife(full: float, leave_one_out: np.ndarray) -> Similarity:
    g = len(leave_one_out)
    mean_loo = float(np.mean(leave_one_out))
    se = math.sqrt((g - 1) / g * float(np.sum((leave_one_out - mean_loo) ** 2)))
    return Similarity(full, full - 1.96 * se, full + 1.96 * se)


def cosine_with_ci(estimate: jax.Array, smoothed: SmoothedGradient, select=lambda t: t) -> Similarity:
    """Cosine between ``estimate`` and ``select(smoothed.grad)`` with a jackknife CI.

    The CI deletes one group of Monte-Carlo pairs at a time (``smoothed.group_grads``), so
    it reflects the Monte-Carlo noise of the smoothed gradient.
    """
    groups = select(smoothed.group_grads)
    g = groups.shape[0]
    full = float(cosine(estimate, select(smoothed.grad)))
    total = jnp.sum(groups, 0)
    loo = np.array([float(cosine(estimate, (total - groups[i]) / (g - 1))) for i in range(g)])
    return _jackknife(full, loo)


def layer_name(path: Sequence[Any]) -> str:
    """'/'-joined key path of a parameter leaf, e.g. ``Dense_0/latent_kernel``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def per_layer_cosine(
    estimate: PyTree, smoothed: SmoothedGradient, *, leaf_filter: Callable[[str], bool] = lambda n: True
) -> dict[str, Similarity]:
    """Cosine similarity (with CI) between an estimator's gradient and ∇L_σ, per leaf."""
    flat_est = dict((layer_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(estimate)[0])
    flat_grad = dict((layer_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(smoothed.grad)[0])
    flat_groups = dict(
        (layer_name(p), v) for p, v in jax.tree_util.tree_flatten_with_path(smoothed.group_grads)[0]
    )
    out = {}
    for name, est in flat_est.items():
        if not leaf_filter(name):
            continue
        sub = SmoothedGradient(flat_grad[name], None, flat_groups[name], smoothed.sigma, smoothed.num_samples)
        out[name] = cosine_with_ci(est, sub)
    return out


# ---------------------------------------------------------- activation perturbations


def input_perturbation(module_path: str):
    """An interceptor factory that adds ``delta`` to the input of one submodule.

    ``module_path`` is the '/'-joined Flax module path (e.g. ``'BinaryDense_1'``); the
    module's ``__call__`` receives ``x + delta``. The gradient of the loss with respect to
    ``delta`` at 0 is then the gradient with respect to that layer's pre-activation (the
    input of its activation binarizer), as the estimator's backward computes it; the
    smoothed loss over ``delta`` is the activation smoothing BinaryDuo's analysis is about.

    Usage::

        with input_perturbation('BinaryDense_1')(delta):
            logits = model.apply(variables, x, ...)
    """

    def with_delta(delta):
        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and "/".join(mod.scope.path) == module_path:
                args = (args[0] + delta.astype(args[0].dtype),) + tuple(args[1:])
            return next_fun(*args, **kwargs)

        return nn.intercept_methods(interceptor)

    return with_delta


def module_input_shape(apply_fn: Callable[[], Any], module_path: str) -> tuple[int, ...]:
    """Shape of the first input that ``module_path`` receives when ``apply_fn()`` runs."""
    shapes = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and "/".join(context.module.scope.path) == module_path:
            shapes.append(tuple(args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(apply_fn)
    if not shapes:
        raise ValueError(f"No module at path {module_path!r} was called.")
    return shapes[0]
