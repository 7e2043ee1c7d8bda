# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The backward estimators side by side
#
# Every sign-forward binarizer in `binax.binarizers` computes the same forward,
# `sign(x)` (0 → +1); they differ only in the surrogate derivative their backward
# returns. This notebook plots `d/dx` of each estimator over `x ∈ [−2, 2]` as the library
# computes it — with `jax.vjp` through the functions `binax.binarizers.resolve` returns,
# nothing re-typed — next to the multi-level activations BinaryDuo compares against, and
# the derivative of the **smoothed** sign that the gradient-mismatch study
# (`02_mismatch_vs_sigma`) measures every estimator against.

# %% tags=["parameters"]
import os

QUICK = os.environ.get("BINAX_NOTEBOOK_QUICK") == "1"  # set by tests/test_notebooks.py
FIGURE_DIR = os.environ.get("BINAX_FIGURE_DIR")  # save PNGs there when set
NUM_POINTS = 201 if QUICK else 2001

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.stats import norm

from binax import binarizers, mismatch

X = jnp.linspace(-2.0, 2.0, NUM_POINTS)


def forward_and_derivative(overrides, progress=1.0):
    """``(q(x), dq/dx)`` of a model's input quantizer, as its backward computes it."""
    fn = binarizers.resolve(overrides["input_quantizer"], **dict(overrides.get("input_quantizer_kwargs", {})))
    y, vjp = jax.vjp(lambda v: fn(v, progress), X)
    (dx,) = vjp(jnp.ones_like(y))  # elementwise quantizer: the VJP of ones is the derivative
    return np.asarray(y), np.asarray(dx)


def save(fig, name):
    if FIGURE_DIR:
        os.makedirs(FIGURE_DIR, exist_ok=True)
        fig.savefig(os.path.join(FIGURE_DIR, name), dpi=110, bbox_inches="tight")


# %% [markdown]
# ## Sign-forward estimators
#
# STE passes the gradient unchanged; clipped STE keeps it on `|x| ≤ 1`; ApproxSign is
# the triangle `max(0, 2 − 2|x|)`; SwishSign (β = 5) a sharper bump with negative lobes;
# EDE `k t sech²(t x)` with `k = max(1/t, 1)` and tanh `ν sech²(ν x)` are bumps whose
# width is `1/t` or `1/ν`. The dashed grey curves are the derivative of the Gaussian-
# smoothed sign, `d/dx E sign(x + σε) = 2φ(x/σ)/σ`: for a single unit, that is the
# "true" gradient each estimator is measured against at smoothing scale σ. An estimator
# matches best the σ whose bump has its width.

# %%
estimators = mismatch.sign_estimators(ede_t=(1.0, 10.0), tanh_nu=(5.0,))
fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for label, overrides in estimators.items():
    y, dx = forward_and_derivative(overrides)
    ax[0].plot(X, dx, label=label)
    if label.startswith("tanh"):
        ax[1].plot(X, y, label=f"{label} (forward)")
ax[1].plot(X, forward_and_derivative({"input_quantizer": "sign"})[0], "k", label="sign (every other forward)")
for sigma in (0.1, 0.3, 1.0):
    ax[0].plot(X, 2 * norm.pdf(X / sigma) / sigma, "--", color="grey", lw=1)
    ax[0].annotate(f"σ={sigma:g}", (0.0, 2 * float(norm.pdf(0.0)) / sigma), color="grey", fontsize=8)
ax[0].set(title="backward: dq/dx (dashed: smoothed sign, 2φ(x/σ)/σ)", xlabel="x", ylim=(-0.6, 10.5))
ax[1].set(title="forward", xlabel="x")
ax[0].legend(fontsize=8)
ax[1].legend(fontsize=8)
save(fig, "estimators_sign.png")
plt.show()

# %% [markdown]
# The same derivatives on a log scale: the clipped STE and ApproxSign put most of their
# mass far from 0, where the smoothed sign has almost none for small σ.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for label, overrides in estimators.items():
    ax.semilogy(X, np.maximum(forward_and_derivative(overrides)[1], 1e-4), label=label)
ax.set(xlabel="x", ylabel="dq/dx (floored at 1e-4)", ylim=(1e-4, 20))
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## Schedules: EDE's `t` and tanh's `ν` as training progresses
#
# `resolve('ede_sign')` computes `(t, k)` from `progress` (IR-Net: `t` from 0.1 to 10,
# `k = max(1/t, 1)`): the backward starts as a wide, flat STE and ends as a narrow bump.
# `resolve('tanh_sign')` computes `ν` from 1 to 1000: the forward itself sharpens to sign.

# %%
fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for p in (0.0, 0.25, 0.5, 0.75, 1.0):
    t, k = binarizers.ede_params(p)
    ax[0].plot(X, forward_and_derivative({"input_quantizer": "ede_sign"}, progress=p)[1],
               label=f"progress {p:g}: t={float(t):.2g}, k={float(k):.2g}")
    nu = binarizers.nu_schedule(p)
    ax[1].plot(X, forward_and_derivative({"input_quantizer": "tanh_sign"}, progress=p)[0],
               label=f"progress {p:g}: ν={float(nu):.3g}")
ax[0].set(title="EDE backward over training", xlabel="x", yscale="log", ylim=(1e-3, 20))
ax[1].set(title="tanh(νx) forward over training", xlabel="x")
ax[0].legend(fontsize=8)
ax[1].legend(fontsize=8)
save(fig, "estimators_schedules.png")
plt.show()

# %% [markdown]
# ## Multi-level activations (BinaryDuo's comparison)
#
# BinaryDuo's binary activation `1[x ≥ 0.5]` on {0, 1} and coupled ternary activation on
# {0, ½, 1}, Larq's ternary `ste_tern` (threshold 0.5 here) and DoReFa's 2-bit activation
# all use a straight-through backward on their clipping range. The forward has more
# steps, spaced closer than the STE window; smoothing a staircase with several steps
# inside the window gives a flatter derivative, closer to the STE's box: this is
# BinaryDuo's argument for why a ternary activation has less gradient mismatch.

# %%
fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
for label, overrides in mismatch.MULTILEVEL_ACTIVATIONS.items():
    y, dx = forward_and_derivative(overrides)
    ax[0].plot(X, y, label=label)
    ax[1].plot(X, dx + 0.03 * len(ax[1].lines), label=label)  # offset so the boxes don't overlap
ax[0].set(title="forward", xlabel="x")
ax[1].set(title="backward (curves offset by 0.03)", xlabel="x")
ax[0].legend(fontsize=8)
save(fig, "estimators_multilevel.png")
plt.show()

# %% [markdown]
# Checks that the plotted derivatives are what the docstrings state (the notebook fails
# if a binarizer's backward changes).

# %%
x = np.asarray(X)
_, dx = forward_and_derivative(estimators["ApproxSign"])
np.testing.assert_allclose(dx, np.maximum(0, 2 - 2 * np.abs(x)), atol=1e-6)
_, dx = forward_and_derivative(estimators["clipped STE"])
np.testing.assert_array_equal(dx, (np.abs(x) <= 1).astype(np.float32))
_, dx = forward_and_derivative(estimators["EDE t=10"])
np.testing.assert_allclose(dx, 10 / np.cosh(10 * x) ** 2, rtol=1e-4, atol=1e-6)
print("derivatives match their formulas")
