"""Packed model export: the file, and packed inference against the training graph in eval mode.

Every registry model (``binax.models.names()``, so new models are covered) is exported at
a small width with BatchNorm statistics calibrated on real Fashion-MNIST test images and
then perturbed (random γ signs, shifted means, scaled variances), so that the BN → sign
thresholds fall inside the accumulator range. Packed inference must give the same
predictions and the same logits (up to float rounding) as
``model.apply(variables, x, train=False, progress=1.0)``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import zipfile

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import binax
import binax.data
import binax.export as bx
from binax import layers as L
from binax.export import inference as inf
from binax.export import packing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def fashion(n: int = 8) -> np.ndarray:
    """``n`` Fashion-MNIST test images in [−0.5, 0.5], (n, 28, 28, 1) float32."""
    images, _ = binax.data.load_arrays("fashion_mnist", "test")
    return images[:n].astype(np.float32) / 255.0 - 0.5


def images_for(shape, n: int = 8) -> np.ndarray:
    """Fashion-MNIST images at ``shape``: upscaled ×2 for 56+ pixels, zero-padded, tiled to C."""
    h, w, c = shape
    im = fashion(n)
    if h >= 56:
        im = np.repeat(np.repeat(im, 2, axis=1), 2, axis=2)
    top, left = (h - im.shape[1]) // 2, (w - im.shape[2]) // 2
    im = np.pad(im, ((0, 0), (top, h - im.shape[1] - top), (left, w - im.shape[2] - left), (0, 0)))
    return np.tile(im, (1, 1, 1, c))


def input_shape_for(model) -> tuple[int, int, int]:
    """Fashion-MNIST's 28×28×1 where the model takes it, else 32×32×3, else 64×64×3."""
    need = getattr(model, "min_input_size", 1)
    if need <= 4:
        return (28, 28, 1)
    return (32, 32, 3) if need <= 32 else (64, 64, 3)


def small_config(name: str) -> dict:
    """Small widths (and one block per ResNet stage) to keep compilation short."""
    defaults = binax.models.get_config(name)
    cfg = {"width_multiplier": 0.1}
    if name == "bnn_mlp":
        cfg = {"widths": (72, 40, 36)}  # not multiples of 32: the words' padding bits count
    if "stage_sizes" in defaults:
        cfg["stage_sizes"] = (1,) * len(defaults.stage_sizes)
    if defaults.num_classes != 10:
        cfg["num_classes"] = 10
    return cfg


def random_params(abstract, rng) -> dict:
    """Random parameters by name (no jitted init: XLA compiles the RNG slowly on CPU)."""

    def leaf(path, s):
        name = path[-1].key
        shape = s.shape
        if name == "latent_kernel":
            return rng.standard_normal(shape)
        if name == "kernel":  # float layers: unit-variance outputs
            return rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        if name == "scale":  # BatchNorm γ: a quarter negative (flipped thresholds)
            return rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < 0.25, -1.0, 1.0)
        if name in ("bias", "shift", "shift_in", "shift_out"):
            return 0.2 * rng.standard_normal(shape)
        if name == "slope":
            return rng.uniform(0.0, 0.5, shape)
        if name == "shifts":  # ABC-Net v_n: thresholds 0.5 − v_n spread over [−1, 1]
            return 0.5 - np.linspace(-1.0, 1.0, shape[0]) + 0.05 * rng.standard_normal(shape)
        if name == "betas":
            return rng.uniform(0.2, 0.6, shape)
        raise AssertionError(f"no random rule for parameter {name!r}")

    return jax.tree_util.tree_map_with_path(lambda p, s: leaf(p, s).astype(np.float32), abstract)


def _observed_eval(model):
    """Jitted ``model.apply(v, x, train=False, progress=1.0)`` that also returns every
    BatchNorm input's per-channel mean and variance (observed, not changed)."""

    def fn(variables, x):
        seen = {}

        def observe(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                y = args[0]
                axes = tuple(range(y.ndim - 1))
                seen[tuple(context.module.path)] = (jnp.mean(y, axes), jnp.var(y, axes))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(observe):
            logits = model.apply(variables, x, train=False, progress=1.0)
        return logits, seen

    return jax.jit(fn)


def calibrated(model, x: np.ndarray, seed: int = 0) -> tuple[dict, np.ndarray]:
    """(variables, eval-mode logits of ``x``): random weights, BatchNorm statistics of ``x``.

    Each BatchNorm gets the mean and variance of its input on ``x`` in eval mode (one
    pass per BatchNorm in depth order, all with one compilation), then perturbed: means
    shifted, variances scaled by 0.5..2, so that thresholds are not at the batch median.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = random_params(abstract["params"], rng)
    stats = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract.get("batch_stats", {}))
    stats = jax.tree_util.tree_map_with_path(lambda p, a: a + (p[-1].key == "var"), stats)
    fn = _observed_eval(model)
    paths = [tuple(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]]
    for _ in range(len(set(paths)) + 1):
        _, seen = fn({"params": params, "batch_stats": stats}, x)
        for path, (mean, var) in seen.items():
            node = stats
            for k in path:
                node = node[k]
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var) + 1e-3
    for path in set(paths):
        node = stats
        for k in path:
            node = node[k]
        std = np.sqrt(node["var"])
        node["mean"] = (node["mean"] + 0.25 * std * rng.standard_normal(std.shape)).astype(np.float32)
        node["var"] = (node["var"] * rng.uniform(0.5, 2.0, std.shape)).astype(np.float32)
    variables = {"params": params, "batch_stats": stats}
    logits, _ = fn(variables, x)
    return variables, np.asarray(logits)


def assert_same_logits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert np.ptp(want, axis=0).max() > 0  # the images give different logits: not trivial


def exported(name: str, cfg: dict, seed: int = 0, runtime: str = "auto", ref_cfg: dict | None = None):
    """(packed model, reference eval-mode logits, images) for ``name`` with ``cfg``.

    ``ref_cfg``: the config of the reference graph when it differs (tanh_sign -> sign).
    """
    ref_model = binax.models.create(name, **(ref_cfg or cfg))
    shape = input_shape_for(ref_model)
    x = images_for(shape)
    variables, ref = calibrated(ref_model, x, seed)
    packed = bx.export(name, cfg, variables, shape, runtime=runtime)
    return packed, ref, x


# ------------------------------------------------------------------------- every model


@pytest.mark.parametrize("name", binax.models.names())
def test_every_registry_model_matches_its_eval_graph(name):
    packed, ref, x = exported(name, small_config(name))
    assert_same_logits(packed(x), ref)
    assert any(layer.packed for layer in packed.layers.values()), packed.report()
    # Binary layers with sign-like inputs all run on XOR-popcount.
    assert "float (kernel unpacked" not in packed.report()
