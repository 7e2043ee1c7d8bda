"""Multi-stage recipes: what a method needs beyond one training run.

``run(config, workdir)`` dispatches on ``config.recipe.procedure``:

* ``'train'``: one ``binax.train.train_and_evaluate`` run.
* ``'self_binarizing'`` (Lahoud & Achanta 2019): train with ``tanh(nu x)``, then evaluate
  the deployed network (``sign`` for tanh, BinaryBN thresholds for BN → sign) on the test
  set and report how often its predictions agree with the trained network at nu_max.
* ``'binaryduo'`` (Kim et al. ICLR 2020): train the coupled ternary network, decouple it
  into the binary network whose coupled layers' outputs are copied twice (tied weights),
  check on the test set that both compute the same logits, fine-tune the decoupled
  network, and report the three accuracies.

Each stage has its own workdir under ``workdir`` and resumes like any run. With a
validation split (``data.validation_holdout``) every accuracy a recipe reports on the test
set is reported on the validation split too (``validation_accuracy``, and per stage
``tanh_``/``coupled_``/``decoupled_validation_accuracy``): choices read those.
:func:`binaryduo_widths` gives the coupled network the baseline's binary-op count.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

import binax.data
from binax import files, models, train, transforms
from binax.errors import ConfigError
from binax.train import config_check, evaluate
from binax.train.workdir import environment_errors, lock_workdir, usable_workdir

__all__ = [
    "run", "predict", "binaryduo", "binaryduo_widths", "check_decoupling", "decouple", "finetune_config",
    "FINETUNE_LR_FACTOR", "self_binarizing",
]


def predict(model, variables: Mapping[str, Any], ds, batch_size: int = 1000, progress: float = 1.0,
            split: str = "test"):
    """Logits and labels of every example of ``split`` (eval mode), as numpy arrays
    (``binax.train.evaluate``)."""
    result = evaluate(model, variables, ds.eval_batches(batch_size, split), progress=progress, keep_logits=True)
    return result.logits, result.labels


def _validation_accuracy(model, variables, ds, batch_size: int) -> dict:
    """``{'validation_accuracy': ...}`` of ``model`` on ``ds``'s validation split; empty
    when ``ds`` has none (``data.validation_holdout = 0``)."""
    if not ds.num_validation:
        return {}
    logits, labels = predict(model, variables, ds, batch_size, split="validation")
    return {"validation_accuracy": float(np.mean(logits.argmax(-1) == labels))}


def _prefixed(prefix: str, summary: Mapping[str, Any]) -> dict:
    """``{prefix + key: value}`` of a stage's ``validation_accuracy``, if it has one."""
    return {prefix + k: v for k, v in summary.items() if k == "validation_accuracy"}


def _dataset(config):
    return binax.data.create(config.data, seed=config.seed)


def _write(workdir: str, name: str, summary: dict) -> dict:
    files.write_json(os.path.join(workdir, name), summary, sort_keys=True)
    return summary


def self_binarizing(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Train a tanh(nu x) network, then evaluate it as sign + BinaryBN (the deployed form)."""
    os.makedirs(workdir, exist_ok=True)
    final = train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
    model, variables, _, _ = train.restore_variables(workdir, step="latest")
    ds = _dataset(config)
    trained_logits, labels = predict(model, variables, ds, config.eval_batch_size, progress=1.0)
    folded, fvars = transforms.self_binarizing_inference(model, variables, ds.image_shape)
    sign_logits, _ = predict(folded, fvars, ds, config.eval_batch_size)
    trained_pred, sign_pred = trained_logits.argmax(-1), sign_logits.argmax(-1)
    summary = {
        "test_accuracy": float(np.mean(sign_pred == labels)),
        "tanh_test_accuracy": float(np.mean(trained_pred == labels)),
        # The deployed network's validation accuracy is what a choice of its schedule reads.
        **_validation_accuracy(folded, fvars, ds, config.eval_batch_size),
        **_prefixed("tanh_", final),
        "agreement": float(np.mean(sign_pred == trained_pred)),
        "train_time_s": final.get("train_time_s"),
        "wall_time_s": final.get("wall_time_s"),
    }
    print(
        f"self-binarizing: tanh(nu_max) {100 * summary['tanh_test_accuracy']:.2f}%, sign + BinaryBN "
        f"{100 * summary['test_accuracy']:.2f}%, prediction agreement {100 * summary['agreement']:.2f}%"
        + (f"; sign + BinaryBN validation {100 * summary['validation_accuracy']:.2f}%" if "validation_accuracy" in summary else ""),
        flush=True,
    )
    return _write(workdir, "recipe.json", summary)


@functools.lru_cache(maxsize=None)
def _binaryduo_widths(name: str, input_shape: tuple, baseline: tuple) -> dict:
    duo = dict(kernel_quantizer="duo_weight", latent_weight_clip=None)
    base = models.create(name, **dict(baseline), input_quantizer="duo_binary", **duo)
    if base.width_multiplier != 1.0 or getattr(base, "replicate", 1) != 1:
        raise ConfigError(
            f"binaryduo_widths needs the baseline at width_multiplier=1 and replicate=1; got "
            f"width_multiplier={base.width_multiplier!r}, replicate={getattr(base, 'replicate', 1)!r}."
        )
    couplings = transforms.binaryduo_couplings(base)
    # Each layer's width as (config key, index) into the model's widths / hidden_dense.
    where = {s.path[-1]: s.width for s in base.chain() if s.kind == "layer" and s.width is not None}
    widths = {key: list(getattr(base, key)) for key, _ in where.values()}
    for producer, _, _ in couplings:
        key, i = where[producer]
        widths[key][i] = int(widths[key][i] / math.sqrt(2))
    last, _, consumer = couplings[-1]

    def cost(model):
        s = binax.summary(model, input_shape)
        return sum(s.layer(n).binary_ops for n in (last, consumer))

    def overrides():
        return {key: tuple(ws) for key, ws in widths.items()}

    # Both layers' binary operations are proportional to the last coupled width: one solve.
    trial = models.create(name, **{**dict(baseline), **overrides()}, input_quantizer="duo_ternary", **duo)
    key, i = where[last]
    widths[key][i] = max(1, round(widths[key][i] * cost(base) / cost(trial)))
    return overrides()


def binaryduo_widths(name: str, input_shape, **baseline) -> dict:
    """Coupled-network widths with the baseline binary network's binary-op count.

    BinaryDuo's rule, read from the official tiny VGG-7 (``models/tinyVGG7.lua`` 64-64-128-
    128-512-512 → ``tinyVGG7_coupled.lua`` 45-45-90-90-336-512): a ternary activation is
    two binary ones, so every layer whose batch norm feeds a ternary activation gets
    ``floor(W/√2)`` channels, which keeps each binary layer between two such layers at the
    baseline's cost; the last of them gets the width that gives the two layers next to it
    (it and its consumer) the baseline's binary operations (336 in tiny VGG-7); layers
    whose output is not binarized keep their width. Costs are ``binax.summary``'s
    ``binary_ops`` (a ternary input is two binary planes). ``baseline`` are model
    overrides of the plain binary network (``widths``, ``hidden_dense``, ...); returns the
    width overrides (``{'widths': ...}``, and ``'hidden_dense'`` for VGG models).
    """
    return dict(_binaryduo_widths(name, tuple(input_shape), tuple(sorted(baseline.items()))))


#: Share of test images on which the decoupled network's logits may differ from the coupled
#: one's (by more than 1e-4 of the logit scale) before ``binaryduo`` calls the decoupling wrong.
DECOUPLING_TOLERANCE = 1e-3


def check_decoupling(coupled_logits: np.ndarray, decoupled_logits: np.ndarray) -> tuple[float, float, float]:
    """``(max |logit diff|, share of images whose logits differ, prediction agreement)``;
    raises ``AssertionError`` when more than ``DECOUPLING_TOLERANCE`` of the images differ.

    The two networks are equal in exact arithmetic. In float32 a batch-norm output within
    an ulp of a threshold (``y = 0.25 - 3e-8`` coupled, ``y + 0.25 = 0.5`` decoupled) can
    flip one activation and move that image's logits; a wrong transform moves nearly all.
    """
    per_image = np.max(np.abs(coupled_logits - decoupled_logits), axis=-1)
    scale = float(np.max(np.abs(coupled_logits)))
    differing = float(np.mean(per_image > 1e-4 * max(1.0, scale)))
    agreement = float(np.mean(coupled_logits.argmax(-1) == decoupled_logits.argmax(-1)))
    if differing > DECOUPLING_TOLERANCE:
        raise AssertionError(
            f"decoupled network differs from the coupled one on {differing:.2%} of the test images "
            f"(float rounding at an activation threshold explains at most {DECOUPLING_TOLERANCE:.1%}): "
            f"max |logit diff| {float(np.max(per_image)):.3g} (logit scale {scale:.3g}), "
            f"prediction agreement {agreement:.4f}"
        )
    return float(np.max(per_image)), differing, agreement


#: BinaryDuo fine-tunes at this factor of the coupled network's learning rate when the
#: config does not set ``recipe.finetune_lr_factor``: 1, the coupled network's own rate, as
#: the official code's one ``-LR`` flag gives both stages by default (it publishes no runs'
#: values), and what validation accuracy chose for the MLP and the CNN
#: (``benchmarks/duo_finetune_lr.py``; ``configs/recipe.py`` sets it per architecture).
FINETUNE_LR_FACTOR = 1.0


def decouple(config: ml_collections.ConfigDict, coupled_dir: str):
    """BinaryDuo's decoupling of the trained coupled network in ``coupled_dir``.

    Returns ``(model, variables, overrides, checks)``: the decoupled network (its coupled
    layers' outputs copied twice, tied weights; ``transforms.decouple_binaryduo_model``),
    the model-config overrides that build it, and ``checks``: its agreement with the
    coupled network's test logits (:func:`check_decoupling`) and its test (and validation)
    accuracy before any fine-tuning.
    """
    model, variables, _, _ = train.restore_variables(coupled_dir, step="latest")
    dmodel, dvars, overrides = transforms.decouple_binaryduo_model(model, variables)
    ds = _dataset(config)
    coupled_logits, labels = predict(model, variables, ds, config.eval_batch_size)
    decoupled_logits, _ = predict(dmodel, dvars, ds, config.eval_batch_size)
    max_diff, differing, same_predictions = check_decoupling(coupled_logits, decoupled_logits)
    checks = {
        "decoupled_test_accuracy": float(np.mean(decoupled_logits.argmax(-1) == labels)),
        "decoupling_max_logit_diff": max_diff,
        "decoupling_differing_fraction": differing,
        "decoupling_prediction_agreement": same_predictions,
        **_prefixed("decoupled_", _validation_accuracy(dmodel, dvars, ds, config.eval_batch_size)),
    }
    return dmodel, dvars, overrides, checks


def finetune_config(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    lr_factor: float | None = None) -> ml_collections.ConfigDict:
    """The fine-tuning stage's config: ``config`` with the decoupled model's ``overrides``,
    ``recipe.finetune_epochs`` epochs, and learning rate ``lr · lr_factor`` (default
    ``recipe.finetune_lr_factor``, else :data:`FINETUNE_LR_FACTOR`)."""
    if lr_factor is None:
        lr_factor = config.recipe.get("finetune_lr_factor", FINETUNE_LR_FACTOR)
    ft = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        ft.model[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    ft.num_epochs = config.recipe.finetune_epochs
    ft.optimizer.learning_rate = config.optimizer.learning_rate * lr_factor
    ft.recipe.procedure = "train"
    return ft


def binaryduo(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    """BinaryDuo's three stages: coupled ternary training → decoupling (:func:`decouple`)
    → fine-tuning (:func:`finetune_config`).

    The decoupled network must compute the coupled one's logits on the test set; images
    whose logits differ, from float rounding at an activation threshold, are counted
    (``decoupling_differing_fraction``) and may be at most ``DECOUPLING_TOLERANCE``.
    """
    os.makedirs(workdir, exist_ok=True)
    coupled_dir = os.path.join(workdir, "coupled")
    decoupled_dir = os.path.join(workdir, "decoupled")
    coupled_final = train.train_and_evaluate(config, coupled_dir, allow_config_change=allow_config_change)
    # Before fine-tuning, which donates dvars' buffers, decouple() has measured them.
    dmodel, dvars, overrides, checks = decouple(config, coupled_dir)
    max_diff = checks["decoupling_max_logit_diff"]
    final = train.train_and_evaluate(
        finetune_config(config, overrides), decoupled_dir, init_variables=dvars,
        allow_config_change=allow_config_change,
    )
    summary = {
        "coupled_test_accuracy": coupled_final["test_accuracy"],
        "test_accuracy": final["test_accuracy"],
        **checks,
        "decoupled_widths": list(overrides.get("widths", ())),
        **_prefixed("coupled_", coupled_final),
        **_prefixed("", final),
        "train_time_s": (coupled_final.get("train_time_s") or 0) + (final.get("train_time_s") or 0),
        "wall_time_s": (coupled_final.get("wall_time_s") or 0) + (final.get("wall_time_s") or 0),
    }
    print(
        f"binaryduo: coupled (ternary) {100 * summary['coupled_test_accuracy']:.2f}%, decoupled "
        f"{100 * summary['decoupled_test_accuracy']:.2f}% (max |logit diff| {max_diff:.2g}), fine-tuned "
        f"{100 * summary['test_accuracy']:.2f}%"
        + (f"; validation: coupled {100 * summary['coupled_validation_accuracy']:.2f}%, fine-tuned "
           f"{100 * summary['validation_accuracy']:.2f}%" if "validation_accuracy" in summary else ""),
        flush=True,
    )
    return _write(workdir, "recipe.json", summary)


def run(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    """Run ``config``'s recipe (see the module docstring); returns its summary.

    The config is validated before anything is written; the workdir is locked for the
    whole recipe, every stage included. ``allow_config_change``: see
    :func:`binax.train.train_and_evaluate`.
    """
    procedure = config.get("recipe", {}).get("procedure", "train")
    if procedure not in PROCEDURES:
        raise ConfigError(f"unknown recipe procedure {procedure!r}; valid: {', '.join(PROCEDURES)}")
    train.maybe_initialize_distributed(config.get("distributed"))
    if procedure == "train":  # one run: train_and_evaluate checks and locks its workdir
        return train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)
    config_check.validate(config, jax.device_count())
    workdir = os.path.abspath(workdir)
    with environment_errors(workdir):
        usable_workdir(workdir)
        with lock_workdir(workdir, enabled=jax.process_index() == 0):
            return PROCEDURES[procedure](config, workdir, allow_config_change=allow_config_change)


def _train(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict:
    return train.train_and_evaluate(config, workdir, allow_config_change=allow_config_change)


PROCEDURES = {"train": _train, "self_binarizing": self_binarizing, "binaryduo": binaryduo}
