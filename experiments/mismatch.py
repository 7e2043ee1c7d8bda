"""Gradient-mismatch table: ``python -m experiments.mismatch [--quick] [--output FILE.json]``.

Trains small ``bnn_mlp`` networks on Fashion-MNIST (one with sign activations, one per
multi-level activation of ``binax.mismatch.MULTILEVEL_ACTIVATIONS``), then measures the
cosine similarity between each backward estimator's gradient and the gradient of the
Gaussian-smoothed loss, over the pre-activations of one layer and over its binary
weights (``binax.mismatch.compare_estimators``). Prints markdown tables and writes every
row, the settings, the accuracies, the machine and the wall time as JSON.

The networks are trained by the training system (``binax.train.build_trainer``: the
config's model, data order, Adam, latent-weight clip and per-step progress; no loop of
its own beyond feeding batches and keeping snapshots) and evaluated by
``binax.train.evaluate``. The notebooks use :func:`train`, :func:`load_fashion_mnist`
and :func:`accuracy` from here.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import time
from typing import Any, Sequence

import numpy as np
from absl import app, flags

_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings (seconds): a smoke test of the command.")
_WIDTHS = flags.DEFINE_list("widths", ["256", "256", "256"], "Hidden widths of the bnn_mlp.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 400, "Adam steps per network (batch 128, lr 1e-3).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Test images the loss is measured on.")
_ACT_SIGMAS = flags.DEFINE_list("act_sigmas", ["0.01", "0.03", "0.1", "0.3"], "σ for pre-activation smoothing.")
_WEIGHT_SIGMAS = flags.DEFINE_list("weight_sigmas", ["0.01", "0.03", "0.1"], "σ for weight smoothing (empty: skip).")
_NUM_SAMPLES = flags.DEFINE_list("num_samples", ["256", "1024"], "Monte-Carlo pair counts (the largest is drawn once).")
_LAYER = flags.DEFINE_string("layer", "fc1", "Module whose input (activations) and kernel (weights) are smoothed.")
_MAX_CHANNELS = flags.DEFINE_integer("max_channels", 8, "Output channels of the kernel smoothed (weights).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training and of the Monte-Carlo samples.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (default runs/mismatch/mismatch.json).")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGN_NETWORK = "sign (trained with clipped STE)"


def networks() -> dict[str, tuple[dict, dict]]:
    """Network label -> (its training overrides, the estimators measured on it)."""
    from binax import mismatch

    sign_ests = mismatch.sign_estimators()
    out = {SIGN_NETWORK: (sign_ests["clipped STE"], sign_ests)}
    for label, overrides in mismatch.MULTILEVEL_ACTIVATIONS.items():
        out[label] = (overrides, {label: overrides})
    return out


# ------------------------------------------------------------------ networks to measure


def load_fashion_mnist(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images, labels)`` of ``split``: float32 NHWC, standardized as
    ``binax.data`` does for training (``'mean_std'``)."""
    from binax import data

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
    from binax import data
    from configs import common

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
    """``variables`` after training; ``snapshots[step]`` the variables after ``step``
    updates (progress ``step / steps``); ``losses`` the training loss of every step."""

    model: Any
    variables: Any
    snapshots: dict
    losses: np.ndarray


def train(overrides: dict, *, widths: Sequence[int] = (256, 256, 256), steps: int = 400, batch_size: int = 128,
          learning_rate: float = 1e-3, seed: int = 0, snapshot_steps: Sequence[int] = ()) -> TrainResult:
    """Trains one network of the study with ``binax.train`` (see :func:`train_config`)."""
    import jax

    import binax.data
    from binax import train as train_lib

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got steps={steps}, batch_size={batch_size}.")
    config = train_config(overrides, widths=widths, steps=steps, batch_size=batch_size,
                          learning_rate=learning_rate, seed=seed)
    ds = binax.data.create(config.data, seed=seed)
    trainer = train_lib.build_trainer(config, ds)
    state = jax.jit(trainer.init)()
    step_fn = jax.jit(trainer.train_fn)

    def variables(state):
        return {"params": state.params, "batch_stats": state.batch_stats}

    snapshots = {0: variables(state)} if 0 in snapshot_steps else {}
    losses = []
    for epoch in range(config.num_epochs):
        for batch in itertools.islice(ds.train_batches(epoch, batch_size), trainer.steps_per_epoch):
            state, metrics = step_fn(state, batch)
            losses.append(metrics["loss"])
            if len(losses) in snapshot_steps:
                snapshots[len(losses)] = variables(state)
    return TrainResult(trainer.model, variables(state), snapshots, np.asarray(jax.device_get(losses)))


def accuracy(model, variables, images, labels, progress: float = 1.0) -> float:
    """Top-1 test accuracy in eval mode (``binax.train.evaluate``)."""
    from binax.train import array_batches, evaluate

    return evaluate(model, variables, array_batches(images, labels), progress=progress).accuracy


def machine() -> dict:
    """What the numbers were measured on."""
    import jax

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
) -> dict:
    """Train every network of ``nets`` (default ``networks()``) and measure its estimators.

    Returns ``{'settings', 'networks': {label: {'overrides', 'test_accuracy',
    'train_seconds'}}, 'rows', 'wall_seconds', 'machine'}``; each row is a
    ``compare_estimators`` row with the ``network`` label added.
    """
    import jax

    from binax import mismatch

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
        trained = train(overrides, widths=widths, steps=train_steps, seed=seed)
        acc = accuracy(trained.model, trained.variables, x_test, y_test)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _QUICK.value:
        kwargs = dict(widths=(32, 32), train_steps=20, batch_size=64, act_sigmas=(0.1,), weight_sigmas=(0.05,),
                      num_samples=(48,), max_channels=4, chunk_size=8, num_groups=3)
    else:
        kwargs = dict(widths=tuple(int(w) for w in _WIDTHS.value), train_steps=_TRAIN_STEPS.value,
                      batch_size=_BATCH.value, act_sigmas=tuple(float(s) for s in _ACT_SIGMAS.value),
                      weight_sigmas=tuple(float(s) for s in _WEIGHT_SIGMAS.value),
                      num_samples=tuple(int(n) for n in _NUM_SAMPLES.value), max_channels=_MAX_CHANNELS.value)
    result = run_study(layer=_LAYER.value, seed=_SEED.value, **kwargs)
    output = _OUTPUT.value or os.path.join(_ROOT, "runs", "mismatch", "mismatch.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    from binax import files

    files.write_json(output, _jsonable(result), indent=1, ensure_ascii=False)
    print(report(result))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    app.run(main)
