"""The Gaussian-smoothed loss gradient and how close an estimate is to it.

The loss of a quantized network is piecewise constant, so its true gradient is zero almost
everywhere; the gradient of the smoothed loss ``L_σ(θ) = E_{ε ~ N(0, I)} L(θ + σ ε)``
exists and is estimated by Monte-Carlo with antithetic pairs (:func:`smoothed_grad`;
:func:`coordinate_discrete_grad` is the other reference). The metric is the cosine
similarity, raw (:func:`cosine`, :func:`cosine_with_ci`, :func:`per_layer_cosine`) and
corrected for the Monte-Carlo noise (:func:`group_similarities`), with jackknife
intervals. Functions of any ``loss_fn(params) -> scalar``: nothing here knows a model;
``binax.mismatch`` applies them to binax networks and re-exports them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SmoothedGradient",
    "smoothed_grad",
    "coordinate_discrete_grad",
    "cosine",
    "Similarity",
    "cosine_with_ci",
    "layer_name",
    "per_layer_cosine",
    "group_similarities",
]

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
    separable: bool = False,
) -> SmoothedGradient:
    """Antithetic Monte-Carlo gradient of the Gaussian-smoothed loss ``E L(θ + σε)``.

    Each sample is ``ε (L(θ + σε) − L(θ − σε)) / (2σ)``; samples are evaluated ``chunk_size``
    at a time with ``vmap`` (bounding memory to ``chunk_size`` copies of θ) and accumulated
    with ``lax.scan`` into per-group sums and a sum of squares. ``num_samples`` is rounded
    up so that whole chunks split evenly over ``num_groups`` groups; the count used is
    returned as ``num_samples``.

    ``separable=True`` is for a mean of per-example losses ``L = 1/B Σ_b ℓ_b`` where
    ``ℓ_b`` depends only on row ``b`` of every leaf (the perturbed pre-activations of one
    layer, with batch norm in inference mode): ``loss_fn`` then returns the vector
    ``(ℓ_1, ..., ℓ_B)`` and row ``b`` of a sample is ``ε_b (ℓ_b(+) − ℓ_b(−)) / (2σB)``.
    The dropped cross terms ``ε_b ℓ_c`` (c ≠ b) have mean zero, so the estimate is still
    unbiased; its variance is that of B independent problems of one row's dimension
    instead of one problem of the whole tensor's.

    ``loss_fn`` is a static argument of a jitted kernel: pass the same function object
    for several ``sigma`` values and it is compiled once.
    """
    if not sigma > 0:
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
    if separable:
        rows = {l.shape[0] if l.ndim else None for l in jax.tree.leaves(params32)}
        if len(rows) != 1 or None in rows:
            raise ValueError(
                f"separable=True needs every leaf to have the same leading (example) axis; "
                f"got leaf shapes {[l.shape for l in jax.tree.leaves(params32)]}."
            )
    sums, sq = _smoothed_sums(
        loss_fn, params32, key, jnp.float32(sigma),
        chunk_size=chunk_size, num_chunks=num_chunks, num_groups=num_groups, separable=separable,
    )
    total = jax.tree.map(lambda s: jnp.sum(s, 0), sums)
    mean = jax.tree.map(lambda t: t / n, total)
    var = jax.tree.map(lambda s, m: jnp.maximum(s / n - m * m, 0.0) * n / (n - 1), sq, mean)
    stderr = jax.tree.map(lambda v: jnp.sqrt(v / n), var)
    per_group = n // num_groups
    group_grads = jax.tree.map(lambda s: s / per_group, sums)
    return SmoothedGradient(mean, stderr, group_grads, float(sigma), n)


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "chunk_size", "num_chunks", "num_groups", "separable")
)
def _smoothed_sums(loss_fn, params32, key, sigma, *, chunk_size, num_chunks, num_groups, separable):
    """Per-group sums ``(num_groups, ...)`` and the sum of squares of the MC samples."""
    n = num_chunks * chunk_size

    def one_sample(k):
        eps = _tree_normal(k, params32)
        plus = jax.tree.map(lambda p, e: p + sigma * e, params32, eps)
        minus = jax.tree.map(lambda p, e: p - sigma * e, params32, eps)
        diff = (loss_fn(plus) - loss_fn(minus)) / (2.0 * sigma)
        if not separable:
            return jax.tree.map(lambda e: e * diff, eps)
        rows = diff.shape[0]
        return jax.tree.map(lambda e: e * diff.reshape((rows,) + (1,) * (e.ndim - 1)) / rows, eps)

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
    return sums, sq


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


# ------------------------------------------------- noise-corrected cosine similarity


def _gram(estimate, group_grads) -> tuple[np.ndarray, np.ndarray, float]:
    """float64 Gram matrix of the groups, their dot products with ``estimate``, ``|estimate|²``."""
    e = np.asarray(estimate, np.float64).ravel()
    g = np.asarray(group_grads, np.float64).reshape(len(group_grads), -1)
    return g @ g.T, g @ e, float(e @ e)


def _cosines_from_gram(gram: np.ndarray, eg: np.ndarray, ee: float) -> tuple[float, float]:
    """Raw and noise-corrected cosine from the group Gram matrix (see ``group_similarities``)."""
    k = len(eg)
    s2 = float(gram.sum())  # |Σ_i ĝ_i|²
    dot = float(eg.sum()) / k  # <e, ĝ>, ĝ the mean of the groups
    norm_mean = math.sqrt(max(s2, 0.0)) / k
    raw = dot / (math.sqrt(ee) * norm_mean) if ee > 0 and norm_mean > 0 else 0.0
    # Mean over ordered pairs i != j of <ĝ_i, ĝ_j>: unbiased for |∇L_σ|² (independent groups).
    u = (s2 - float(np.trace(gram))) / (k * (k - 1))
    corrected = dot / (math.sqrt(ee) * math.sqrt(u)) if ee > 0 and u > 0 else float("nan")
    return raw, corrected


def group_similarities(estimate: jax.Array, group_grads: jax.Array) -> tuple[Similarity, Similarity]:
    """Cosine between ``estimate`` and ∇L_σ from ``k >= 3`` independent group means ĝ_i.

    Returns ``(raw, corrected)``, each with a jackknife (delete-one-group) 95% CI.

    * raw: ``cos(e, ĝ)`` with ĝ the mean of the groups. Monte-Carlo noise adds a
      component orthogonal to everything, so in d dimensions with N samples it shrinks the
      cosine roughly by ``1/sqrt(1 + d/N)`` — the same factor for every estimator.
    * corrected: ``<e, ĝ> / (|e| sqrt(U))`` with ``U = 1/(k(k−1)) Σ_{i≠j} <ĝ_i, ĝ_j>``.
      The numerator is unbiased for ``<e, ∇L_σ>`` and U for ``|∇L_σ|²``, so the ratio is a
      consistent estimate of ``cos(e, ∇L_σ)`` that does not shrink with d/N (it is NaN
      when U <= 0, i.e. the signal is not resolved).
    """
    k = len(group_grads)
    if k < 3:
        raise ValueError(f"group_similarities needs >= 3 groups for a jackknife; got {k}.")
    gram, eg, ee = _gram(estimate, group_grads)
    raw, corrected = _cosines_from_gram(gram, eg, ee)
    keep = [np.delete(np.arange(k), i) for i in range(k)]
    loo = np.array([_cosines_from_gram(gram[np.ix_(ix, ix)], eg[ix], ee) for ix in keep])
    return _jackknife(raw, loo[:, 0]), _jackknife(corrected, loo[:, 1])
