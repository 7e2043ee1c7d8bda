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
# # 02 · Gradient mismatch against the smoothing scale σ
#
# The loss of a binary network is piecewise constant in its pre-activations and latent
# weights, so its true gradient is zero almost everywhere. BinaryDuo (Kim et al., ICLR
# 2020) measures a backward estimator against the gradient of the **smoothed** loss
# `L_σ(θ) = E L(θ + σε)`, ε ~ N(0, I), by cosine similarity. This notebook trains small
# `bnn_mlp` networks on Fashion-MNIST — one with sign activations, one per multi-level
# activation — and measures, over the pre-activations entering layer `fc1` and over
# `fc1`'s binary weights:
#
# * on the sign network: STE, clipped STE, ApproxSign, SwishSign, EDE at fixed `t`, and
#   tanh at fixed `ν` (all against the smoothed loss of the sign network);
# * on the {0, 1}, ternary and 2-bit networks: their straight-through backward, against
#   the smoothed loss of their own forward.
#
# The computation is `binax.mismatch.compare_estimators`, run through
# `binax.mismatch_study.run_study` — the same code as the command
# `python -m experiments.mismatch` that produced the table in `docs/mismatch.md`. Set
# `RESULTS_JSON` to that command's output to plot it without recomputing.

# %% tags=["parameters"]
import os

QUICK = os.environ.get("BINAX_NOTEBOOK_QUICK") == "1"  # set by tests/test_notebooks.py
FIGURE_DIR = os.environ.get("BINAX_FIGURE_DIR")  # save PNGs there when set
RESULTS_JSON = os.environ.get("BINAX_MISMATCH_JSON")  # plot a saved run instead of computing
if QUICK:
    SETTINGS = dict(widths=(32, 32, 32), train_steps=20, batch_size=32, act_sigmas=(0.03, 0.3),
                    weight_sigmas=(), num_samples=(48, 96), max_channels=4, chunk_size=8, num_groups=6)
else:
    SETTINGS = dict(widths=(256, 256, 256), train_steps=400, batch_size=256, act_sigmas=(0.01, 0.03, 0.1, 0.3),
                    weight_sigmas=(0.01, 0.03, 0.1), num_samples=(256, 1024), max_channels=8)

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from binax import mismatch
from binax import mismatch_study as study


def save(fig, name):
    if FIGURE_DIR:
        os.makedirs(FIGURE_DIR, exist_ok=True)
        fig.savefig(os.path.join(FIGURE_DIR, name), dpi=80, bbox_inches="tight")


# %%
if RESULTS_JSON:
    with open(RESULTS_JSON) as f:
        result = json.load(f)
    print(f"loaded {RESULTS_JSON}: settings {result['settings']}")
else:
    nets = study.networks()
    if QUICK:  # the three networks the BinaryDuo comparison needs, and fewer estimators
        sign_label = study.SIGN_NETWORK
        keep = ("clipped STE", "ApproxSign", "EDE t=10")
        nets = {sign_label: (nets[sign_label][0], {k: nets[sign_label][1][k] for k in keep}),
                **{k: nets[k] for k in ("duo_binary {0,1}", "duo_ternary {0,½,1}")}}
    result = study.run_study(nets=nets, **SETTINGS)
rows = [{**r, **{k: (np.nan if v is None else v) for k, v in r.items() if k.startswith(("cosine", "ci_", "corrected"))}}
        for r in result["rows"]]
for name, info in result["networks"].items():
    print(f"{name:35s} test accuracy {info['test_accuracy']:.4f}")

# %% [markdown]
# ## Cosine similarity against σ
#
# Solid lines: estimators on the sign network; dashed: multi-level networks with their
# straight-through backward. Error bars: 95% jackknife intervals over groups of Monte-
# Carlo pairs. The **corrected** cosine divides by an unbiased estimate of `|∇L_σ|`
# (`mismatch.group_similarities`), so it does not shrink with the Monte-Carlo noise; the
# raw cosine (right) is what a naive estimate reports.

# %%
def curves(rows, wrt, key, n=None):
    rows = [r for r in rows if r["wrt"] == wrt]
    n = n or max(r["num_samples"] for r in rows)
    out = {}
    for r in rows:
        if r["num_samples"] == n:
            out.setdefault((r["network"], r["estimator"]), []).append(r)
    lo_key, hi_key = ("corrected_ci_low", "corrected_ci_high") if key == "cosine_corrected" else ("ci_low", "ci_high")
    for label, rs in out.items():
        rs.sort(key=lambda r: r["sigma"])
        s = np.array([r["sigma"] for r in rs])
        v = np.array([r[key] for r in rs])
        lo = np.array([r[lo_key] for r in rs])
        hi = np.array([r[hi_key] for r in rs])
        yield label, s, v, np.nan_to_num(v - lo), np.nan_to_num(hi - v)


wrts = [w for w in ("activations", "weights") if any(r["wrt"] == w for r in rows)]
fig, axes = plt.subplots(len(wrts), 2, figsize=(13, 4.5 * len(wrts)), squeeze=False)
for i, wrt in enumerate(wrts):
    for j, key in enumerate(("cosine_corrected", "cosine")):
        ax = axes[i, j]
        for (net, est), s, v, lo, hi in curves(rows, wrt, key):
            style = "-o" if net == study.SIGN_NETWORK else "--s"
            ax.errorbar(s, v, yerr=[lo, hi], fmt=style, ms=4, capsize=2, label=est)
        layer = next(r["layer"] for r in rows if r["wrt"] == wrt)
        ax.set(xscale="log", xlabel="σ", ylabel=key.replace("_", " "), title=f"{wrt}: {layer}")
        ax.axhline(0, color="k", lw=0.5)
axes[0, 0].legend(fontsize=8, ncol=2)
fig.tight_layout()
save(fig, "mismatch_vs_sigma.png")
plt.show()

# %% [markdown]
# ## Cosine against the number of Monte-Carlo samples
#
# The raw cosine rises with N (its shrinkage is about `1/sqrt(1 + d/N)` for `d`
# coordinates per example); the corrected cosine stays put, within its interval.

# %%
act = [r for r in rows if r["wrt"] == "activations"]
sigmas = sorted({r["sigma"] for r in act})
sigma = sigmas[len(sigmas) // 2]
fig, ax = plt.subplots(figsize=(7, 4.2))
for (net, est), _, _, _, _ in curves(rows, "activations", "cosine"):
    rs = sorted((r for r in act if r["network"] == net and r["estimator"] == est and r["sigma"] == sigma),
                key=lambda r: r["num_samples"])
    n = [r["num_samples"] for r in rs]
    line, = ax.plot(n, [r["cosine"] for r in rs], ":o", ms=3)
    ax.plot(n, [r["cosine_corrected"] for r in rs], "-o", ms=3, color=line.get_color(), label=est)
ax.set(xscale="log", xlabel="Monte-Carlo pairs N", ylabel="cosine (dotted raw, solid corrected)",
       title=f"activations, σ={sigma:g}")
ax.legend(fontsize=7, ncol=2)
save(fig, "mismatch_vs_samples.png")
plt.show()

# %% [markdown]
# ## Does a ternary activation reduce mismatch more than a changed backward?
#
# `ternary gain` = corrected cosine of the {0, ½, 1} network minus that of its {0, 1}
# counterpart (both straight-through on [0, 1], BinaryDuo's pair); the gain of a
# backward = that sign estimator minus the clipped STE (the backward the sign network was
# trained with). The claim holds at σ when the ternary gain exceeds every backward gain.
# The statements below are computed from the numbers above, so they stay true to
# whatever run produced them.

# %%
verdict = study.binaryduo_verdict(rows)
names = list(verdict[0]["backward_gains"]) if verdict else []
print(f"{'σ':>6} {'ternary gain':>13} " + " ".join(f"{n:>12}" for n in names))
for v in verdict:
    print(f"{v['sigma']:>6g} {v['ternary_gain']:>+13.3f} " + " ".join(f"{v['backward_gains'][n]:>+12.3f}" for n in names))
print()
print("\n".join(study.verdict_summary(verdict)))
