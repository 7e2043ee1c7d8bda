"""The gradient-mismatch study: small ``bnn_mlp`` networks trained on Fashion-MNIST, their
estimators measured against the Gaussian-smoothed loss (``binax.mismatch``).

Trains one network with sign activations and one per multi-level activation of
``binax.mismatch.MULTILEVEL_ACTIVATIONS``, then measures the cosine similarity between each
backward estimator's gradient and the gradient of the smoothed loss, over the
pre-activations of one layer and over its binary weights
(``binax.mismatch.compare_estimators``); :func:`report` writes the markdown tables.

The networks are trained by the training loop, ``binax.train.train_and_evaluate`` (the
config's model, data order, Adam, latent-weight clip and per-step progress; sharding,
finiteness checks, checkpoints, the evaluation on the test set), whose hooks keep the
snapshots and the losses. The command is ``python -m experiments.mismatch``; the notebooks
use :func:`run_study`, :func:`train`, :func:`load_fashion_mnist` and :func:`accuracy`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import re
import tempfile
import time
from typing import Any, Sequence

import jax
import numpy as np

from binax import config as common
from binax import data, mismatch
from binax import train as train_lib
from binax.train import array_batches, evaluate

SIGN_NETWORK = "sign (trained with clipped STE)"


def networks() -> dict[str, tuple[dict, dict]]:
    """Network label -> (its training overrides, the estimators measured on it)."""
    sign_ests = mismatch.sign_estimators()
    out = {SIGN_NETWORK: (sign_ests["clipped STE"], sign_ests)}
    for label, overrides in mismatch.MULTILEVEL_ACTIVATIONS.items():
        out[label] = (overrides, {label: overrides})
    return out


# ------------------------------------------------------------------ networks to measure


def load_fashion_mnist(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images, labels)`` of ``split``: float32 NHWC, standardized as
    ``binax.data`` does for training (``'mean_std'``)."""
    images, labels = data.load_arrays("fashion_mnist", split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    spec = data.get_spec("fashion_mnist")
    return data.normalize(images.astype(np.float32), spec, "mean_std"), np.asarray(labels, np.int32)


def train_config(overrides: dict, *, widths: Sequence[int], steps: int, batch_size: int = 128,
                 learning_rate: float = 1e-3, seed: int = 0):
    """The training config of one network: ``bnn_mlp`` with ``widths`` and ``overrides``,
    Fashion-MNIST without augmentation, Adam at a constant ``learning_rate``, ``steps``
    updates with progress ``step / steps`` (a run longer than one epoch is whole epochs)."""
    per_epoch = data.create({"name": "fashion_mnist"}, seed=seed).steps_per_epoch(batch_size)
    if steps > per_epoch and steps % per_epoch:
        raise ValueError(f"steps={steps}: more than one epoch ({per_epoch} steps) must be whole epochs.")
    c = common.base_config()
    c.seed = seed
    c.model = common.model_config("bnn_mlp", widths=tuple(widths), **overrides)
    c.data.name = "fashion_mnist"
    c.data.augment = False
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = learning_rate
    c.optimizer.schedule = "constant"
    c.batch_size = batch_size
    c.num_epochs = max(1, steps // per_epoch)
    c.max_steps_per_epoch = min(steps, per_epoch)
    c.progress_unit = "step"
    return c


@dataclasses.dataclass
class TrainResult:
    """``variables`` after training (read back from the final checkpoint); ``snapshots[step]``
    the variables after ``step`` updates (progress ``step / steps``); ``losses`` the
    training loss of every update this call ran (all of them, unless it resumed a run in
    ``workdir``); ``final`` what the run's ``final.json`` holds (``test_accuracy`` on the
    whole test set, ``resumed_from_step``...)."""

    model: Any
    variables: Any
    snapshots: dict
    losses: np.ndarray
    final: dict


def _host_variables(state) -> dict:
    # Copies: the loop donates the state's arrays to the next update.
    return jax.tree.map(np.array, jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))


def train(overrides: dict, *, widths: Sequence[int] = (256, 256, 256), steps: int = 400, batch_size: int = 128,
          learning_rate: float = 1e-3, seed: int = 0, snapshot_steps: Sequence[int] = (),
          workdir: str | None = None, hooks: Sequence[train_lib.Hook] = ()) -> TrainResult:
    """Trains one network of the study (see :func:`train_config`) with the training loop,
    ``binax.train.train_and_evaluate``: its sharding, finiteness checks, checkpoints and
    evaluation, with hooks that keep the snapshots and losses (and the caller's ``hooks``).

    ``workdir``: where the run's checkpoints and records go, so that a stopped run resumes
    there (default: a temporary directory, removed afterwards).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got steps={steps}, batch_size={batch_size}.")
    config = train_config(overrides, widths=widths, steps=steps, batch_size=batch_size,
                          learning_rate=learning_rate, seed=seed)
    snapshots, losses = {}, []

    def keep(step, state, metrics):
        if metrics is not None:  # None: the state before the first update
            losses.append(metrics["loss"])
        if step in snapshot_steps:
            snapshots[step] = _host_variables(state)

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="binax-mismatch-"))
        final = train_lib.train_and_evaluate(config, workdir, hooks=(keep, *hooks))
        model, variables, _, _ = train_lib.restore_variables(workdir, step="latest")
    return TrainResult(model, variables, snapshots, np.asarray(jax.device_get(losses), np.float32), final)


def accuracy(model, variables, images, labels, progress: float = 1.0) -> float:
    """Top-1 test accuracy in eval mode (``binax.train.evaluate``)."""
    return evaluate(model, variables, array_batches(images, labels), progress=progress).accuracy


def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
    }


def run_study(
    *,
    widths=(256, 256, 256),
    train_steps=400,
    batch_size=256,
    act_sigmas=(0.01, 0.03, 0.1, 0.3),
    weight_sigmas=(0.01, 0.03, 0.1),
    num_samples=(256, 1024),
    layer="fc1",
    max_channels=8,
    seed=0,
    nets=None,
    chunk_size=32,
    num_groups=16,
    log=print,
    workdir=None,
) -> dict:
    """Train every network of ``nets`` (default ``networks()``) and measure its estimators.

    Returns ``{'settings', 'networks': {label: {'overrides', 'test_accuracy',
    'train_seconds'}}, 'rows', 'wall_seconds', 'machine'}``; each row is a
    ``compare_estimators`` row with the ``network`` label added. ``workdir``: each
    network trains in a directory of its own under it (:func:`network_dir`), so a rerun
    resumes or reuses its training (default: temporary directories).
    """
    start = time.time()
    info = machine()
    settings = dict(widths=list(widths), train_steps=train_steps, batch_size=batch_size,
                    act_sigmas=list(act_sigmas), weight_sigmas=list(weight_sigmas),
                    num_samples=list(num_samples), layer=layer, max_channels=max_channels, seed=seed,
                    chunk_size=chunk_size, num_groups=num_groups, model="bnn_mlp", dataset="fashion_mnist")
    base = {"widths": tuple(widths)}
    x_test, y_test = load_fashion_mnist("test")
    batch = (x_test[:batch_size], y_test[:batch_size])
    nets = networks() if nets is None else nets
    rows, net_info = [], {}
    for label, (overrides, estimators) in nets.items():
        t0 = time.time()
        trained = train(overrides, widths=widths, steps=train_steps, seed=seed,
                        workdir=None if workdir is None else network_dir(workdir, label))
        acc = trained.final["test_accuracy"]  # the loop's evaluation, on the whole test set
        net_info[label] = {"overrides": _jsonable(overrides), "test_accuracy": acc,
                           "train_seconds": round(time.time() - t0, 1)}
        log(f"{label}: trained {train_steps} steps in {time.time() - t0:.1f}s, test accuracy {acc:.4f}")
        for wrt, sigmas, extra in (("activations", act_sigmas, {}),
                                   ("weights", weight_sigmas, {"max_channels": max_channels})):
            if not sigmas:
                continue
            t0 = time.time()
            got = mismatch.compare_estimators(
                "bnn_mlp", base, trained.variables, batch, estimators, sigmas, num_samples, wrt=wrt,
                layer=layer, seed=seed, chunk_size=chunk_size, num_groups=num_groups, **extra)
            rows += [{"network": label, **r} for r in got]
            log(f"  {wrt}: {len(got)} rows in {time.time() - t0:.1f}s")
        jax.clear_caches()  # compiled kernels of this network are not reused
    info["load_average_at_end"] = os.getloadavg()
    return {"settings": settings, "networks": net_info, "rows": rows,
            "wall_seconds": round(time.time() - start, 1), "machine": info}


def network_dir(workdir: str, label: str) -> str:
    """``workdir/<label as a file name>``, e.g. ``duo_ternary_0_1`` for ``duo_ternary {0,½,1}``."""
    return os.path.join(workdir, re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_"))


def _jsonable(value):
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _cell(row, corrected: bool) -> str:
    key = "cosine_corrected" if corrected else "cosine"
    lo, hi = ("corrected_ci_low", "corrected_ci_high") if corrected else ("ci_low", "ci_high")
    if row[key] is None or row[key] != row[key]:  # NaN: |∇L_σ| not resolved
        return "n/r"
    return f"{row[key]:.2f} [{row[lo]:.2f}, {row[hi]:.2f}]"


def markdown_table(rows, *, wrt: str, corrected: bool = True, num_samples: int | None = None) -> str:
    """Networks × estimators down, σ across; cells ``cos [95% CI]`` at ``num_samples``
    (default: the largest count in ``rows``)."""
    rows = [r for r in rows if r["wrt"] == wrt]
    if not rows:
        return ""
    n = num_samples or max(r["num_samples"] for r in rows)
    rows = [r for r in rows if r["num_samples"] == n]
    sigmas = sorted({r["sigma"] for r in rows})
    keys = list(dict.fromkeys((r["network"], r["estimator"], r["layer"]) for r in rows))
    cells = {(r["network"], r["estimator"], r["layer"], r["sigma"]): _cell(r, corrected) for r in rows}
    out = ["| network | estimator | layer | " + " | ".join(f"σ={s:g}" for s in sigmas) + " |",
           "|---|---|---|" + "---|" * len(sigmas)]
    for net, est, layer in keys:
        out.append(f"| {net} | {est} | {layer} | " + " | ".join(cells.get((net, est, layer, s), "") for s in sigmas) + " |")
    return "\n".join(out)


def samples_table(rows, *, wrt: str, sigma: float) -> str:
    """Raw and corrected cosine against the number of Monte-Carlo pairs at one σ."""
    rows = [r for r in rows if r["wrt"] == wrt and r["sigma"] == sigma]
    counts = sorted({r["num_samples"] for r in rows})
    keys = list(dict.fromkeys((r["network"], r["estimator"]) for r in rows))
    by = {(r["network"], r["estimator"], r["num_samples"]): r for r in rows}
    head = " | ".join(f"raw N={n}" for n in counts) + " | " + " | ".join(f"corrected N={n}" for n in counts)
    out = [f"| network | estimator | {head} |", "|---|---|" + "---|" * (2 * len(counts))]
    for net, est in keys:
        raw = " | ".join(f"{by[(net, est, n)]['cosine']:.3f}" for n in counts)
        cor = " | ".join(_cell(by[(net, est, n)], True).split(" [")[0] for n in counts)
        out.append(f"| {net} | {est} | {raw} | {cor} |")
    return "\n".join(out)


def binaryduo_verdict(rows, *, wrt: str = "activations") -> list[dict]:
    """Per σ: does raising activation precision help more than changing the backward?

    ``ternary_gain``: corrected cosine of the ``duo_ternary`` network minus that of its
    binary counterpart ``duo_binary`` (both straight-through on [0, 1], BinaryDuo's pair).
    ``backward_gains[X]``: sign estimator X minus clipped STE on the sign network (the
    backward the sign network was trained with). ``beaten_by_ternary``: the estimators
    whose gain is below the ternary gain. BinaryDuo's finding holds at σ when
    ``holds``: the ternary gain exceeds every backward gain.
    """
    n = max(r["num_samples"] for r in rows if r["wrt"] == wrt)
    pick = {(r["network"], r["estimator"], r["sigma"]): r["cosine_corrected"]
            for r in rows if r["wrt"] == wrt and r["num_samples"] == n}
    out = []
    for sigma in sorted({k[2] for k in pick}):
        sign = {e: v for (net, e, s), v in pick.items() if net == SIGN_NETWORK and s == sigma}
        tern = pick.get(("duo_ternary {0,½,1}", "duo_ternary {0,½,1}", sigma))
        binary = pick.get(("duo_binary {0,1}", "duo_binary {0,1}", sigma))
        if "clipped STE" not in sign or tern is None or binary is None:
            continue
        gains = {e: v - sign["clipped STE"] for e, v in sign.items() if e != "clipped STE"}
        best = max(gains, key=gains.get)
        out.append(dict(sigma=sigma, ternary_gain=tern - binary, backward_gains=gains, best_backward=best,
                        beaten_by_ternary=[e for e, g in gains.items() if tern - binary > g],
                        holds=bool(tern - binary > gains[best])))
    return out


def verdict_summary(verdict: list[dict]) -> list[str]:
    """Plain sentences: where the claim holds, and which backwards beat the ternary gain."""
    if not verdict:
        return []
    held = [v["sigma"] for v in verdict if v["holds"]]
    names = list(verdict[0]["backward_gains"])
    always = [e for e in names if all(e in v["beaten_by_ternary"] for v in verdict)]
    never = [e for e in names if not any(e in v["beaten_by_ternary"] for v in verdict)]
    if len(held) == len(verdict):
        head = "Reproduced: at every σ the ternary activation gains more than any change of backward."
    elif held:
        head = f"Partly reproduced: the ternary gain exceeds every backward gain only at σ in {held}."
    else:
        head = "Not reproduced: at every σ some change of backward for sign gains more than the ternary activation."
    return [head,
            f"The ternary gain exceeds the gain of {', '.join(always) or 'no estimator'} at every σ.",
            f"{', '.join(never) or 'No estimator'} gain{'s' if len(never) == 1 else ''} at least as much as the "
            f"ternary activation at every σ."]


def report(result) -> str:
    """The markdown the command prints."""
    rows = result["rows"]
    parts = [f"Wall time {result['wall_seconds']:.0f} s on {result['machine']['cpu_count']} CPU cores "
             f"({result['machine']['cpu']}); load average at start "
             f"{result['machine']['load_average_at_start'][0]:.1f}.", "",
             "| network | test accuracy |", "|---|---|"]
    parts += [f"| {k} | {v['test_accuracy']:.4f} |" for k, v in result["networks"].items()]
    for wrt in ("activations", "weights"):
        if any(r["wrt"] == wrt for r in rows):
            n = max(r["num_samples"] for r in rows if r["wrt"] == wrt)
            what = (f"the input of {result['settings']['layer']} over {result['settings']['batch_size']} test images"
                    if wrt == "activations" else
                    f"{result['settings']['max_channels']} random output channels of {result['settings']['layer']}'s kernel")
            parts += ["", f"### {wrt} ({what}): corrected cosine [95% CI], N = {n}", "",
                      markdown_table(rows, wrt=wrt, corrected=True),
                      "", f"### {wrt}: raw cosine [95% CI], N = {n}", "",
                      markdown_table(rows, wrt=wrt, corrected=False)]
    act = [r for r in rows if r["wrt"] == "activations"]
    if act:
        sigmas = sorted({r["sigma"] for r in act})
        sigma = sigmas[len(sigmas) // 2]
        parts += ["", f"### activations, σ={sigma:g}: cosine against the number of samples", "",
                  samples_table(rows, wrt="activations", sigma=sigma)]
        verdict = binaryduo_verdict(rows)
        if verdict:
            names = list(verdict[0]["backward_gains"])
            parts += ["", "### BinaryDuo's claim: ternary gain against backward gains (corrected cosine)", "",
                      "ternary gain = duo_ternary − duo_binary; backward gain = estimator − clipped STE "
                      "on the sign network.", "",
                      "| σ | ternary gain | " + " | ".join(names) + " | holds |",
                      "|---|---|" + "---|" * len(names) + "---|"]
            parts += [f"| {v['sigma']:g} | {v['ternary_gain']:+.3f} | "
                      + " | ".join(f"{v['backward_gains'][e]:+.3f}" for e in names)
                      + f" | {'yes' if v['holds'] else 'no'} |" for v in verdict]
            parts += [""] + verdict_summary(verdict)
    return "\n".join(parts)
