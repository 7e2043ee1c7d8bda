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
# # 03 · How EDE's `t` and tanh's `ν` schedules move the mismatch during training
#
# IR-Net's Error Decay Estimator raises `t` from 0.1 to 10 over training (backward
# `k t sech²(t x)`, `k = max(1/t, 1)`): a wide, STE-like backward early, a narrow bump
# late. Self-Binarizing networks train `tanh(ν x)` with `ν` growing from 1 to 1000 and
# deploy `sign`. This notebook trains a small `bnn_mlp` on Fashion-MNIST with each, keeps
# snapshots at several points of `progress`, and at each measures the cosine similarity
# between the estimator's gradient (at that point's schedule) and the gradient of the
# smoothed loss of the **deployed sign network**, over the pre-activations entering `fc1`
# (`binax.mismatch.compare_estimators`). The clipped STE at the same weights is the
# baseline.

# %% tags=["parameters"]
import os

QUICK = os.environ.get("BINAX_NOTEBOOK_QUICK") == "1"  # set by tests/test_notebooks.py
FIGURE_DIR = os.environ.get("BINAX_FIGURE_DIR")  # save PNGs there when set
if QUICK:
    WIDTHS, TRAIN_STEPS, SNAPSHOTS = (32, 32, 32), 20, (0, 20)
    BATCH, SIGMAS, NUM_SAMPLES, MC = 32, (0.1,), 24, dict(chunk_size=8, num_groups=3)
else:
    # 1404 steps of 128 images: 3 epochs of Fashion-MNIST.
    WIDTHS, TRAIN_STEPS, SNAPSHOTS = (256, 256, 256), 1404, (0, 351, 702, 1053, 1404)
    BATCH, SIGMAS, NUM_SAMPLES, MC = 256, (0.03, 0.3), 512, dict(chunk_size=32, num_groups=8)
LAYER = "fc1"

# %%
import matplotlib.pyplot as plt
import numpy as np

# The networks are trained by the study's `train` (binax.train's trainer) and scored by
# its `accuracy` (binax.train.evaluate).
from binax import binarizers, mismatch, models
from binax import mismatch_study as study

x_test, y_test = study.load_fashion_mnist("test")
batch = (x_test[:BATCH], y_test[:BATCH])
base = {"widths": WIDTHS}
clipped = mismatch.sign_estimators()["clipped STE"]
deployed = models.create("bnn_mlp", **base, input_quantizer="sign")


def save(fig, name):
    if FIGURE_DIR:
        os.makedirs(FIGURE_DIR, exist_ok=True)
        fig.savefig(os.path.join(FIGURE_DIR, name), dpi=110, bbox_inches="tight")


def track(label, overrides):
    """Train with ``overrides`` and measure its schedule's estimator at every snapshot."""
    run = study.train(overrides, widths=WIDTHS, steps=TRAIN_STEPS, snapshot_steps=SNAPSHOTS)
    out = []
    for step in SNAPSHOTS:
        progress = step / TRAIN_STEPS
        variables = run.snapshots[step]
        rows = mismatch.compare_estimators(
            "bnn_mlp", base, variables, batch, {label: overrides, "clipped STE": clipped}, SIGMAS, NUM_SAMPLES,
            wrt="activations", layer=LAYER, progress=progress, **MC)
        acc = study.accuracy(deployed, variables, x_test, y_test)
        out += [{**r, "progress": progress, "deployed_accuracy": acc} for r in rows]
        print(f"{label}: progress {progress:.2f}  deployed sign accuracy {acc:.4f}  " + "  ".join(
            f"{r['estimator']} σ={r['sigma']:g}: {r['cosine_corrected']:.2f}" for r in rows))
    return out


ede_rows = track("EDE (schedule)", {"input_quantizer": "ede_sign", "input_quantizer_kwargs": {}})
tanh_rows = track("tanh (schedule)", {"input_quantizer": "tanh_sign", "input_quantizer_kwargs": {}})

# %% [markdown]
# ## Cosine against training progress
#
# Solid: the scheduled estimator; dotted: clipped STE at the same weights. Grey (right
# axis): the schedule value. A narrow backward (large `t` or `ν`) matches the smoothed
# gradient at small σ and misses it at large σ, where the smoothing spreads over a wider
# band than the bump (see `01_estimators`).

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
for ax, rows, name, sched in (
    (axes[0], ede_rows, "EDE", lambda p: float(binarizers.ede_params(p)[0])),
    (axes[1], tanh_rows, "tanh", lambda p: float(binarizers.nu_schedule(p))),
):
    for sigma in SIGMAS:
        for est, style in ((f"{name} (schedule)", "-o"), ("clipped STE", ":s")):
            rs = [r for r in rows if r["sigma"] == sigma and r["estimator"] == est]
            p = np.array([r["progress"] for r in rs])
            v = np.array([r["cosine_corrected"] for r in rs])
            err = [np.nan_to_num(v - [r["corrected_ci_low"] for r in rs]),
                   np.nan_to_num(np.array([r["corrected_ci_high"] for r in rs]) - v)]
            ax.errorbar(p, v, yerr=err, fmt=style, ms=4, capsize=2, label=f"{est}, σ={sigma:g}")
    twin = ax.twinx()
    grid = np.linspace(0, 1, 50)
    twin.semilogy(grid, [sched(g) for g in grid], color="grey", alpha=0.5)
    twin.set_ylabel("t" if name == "EDE" else "ν", color="grey")
    ax.set(xlabel="training progress", ylabel="corrected cosine", title=f"{name}: mismatch during training")
    ax.legend(fontsize=7)
for rows, name in ((ede_rows, "EDE"), (tanh_rows, "tanh")):
    rs = {r["progress"]: r["deployed_accuracy"] for r in rows}
    axes[2].plot(list(rs), list(rs.values()), "-o", label=f"trained with {name}")
axes[2].set(xlabel="training progress", ylabel="test accuracy of the sign network", title="deployed accuracy")
axes[2].legend()
fig.tight_layout()
save(fig, "schedules.png")
plt.show()

# %% [markdown]
# Each snapshot's numbers, at the largest σ and the smallest:

# %%
for rows in (ede_rows, tanh_rows):
    for r in rows:
        if r["sigma"] in (min(SIGMAS), max(SIGMAS)):
            print(f"{r['estimator']:16s} progress {r['progress']:.2f} σ={r['sigma']:<5g} "
                  f"corrected {r['cosine_corrected']:+.3f} [{r['corrected_ci_low']:+.3f}, {r['corrected_ci_high']:+.3f}]"
                  f"  raw {r['cosine']:+.3f}")
