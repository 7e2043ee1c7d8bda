"""Multi-stage recipes: what a method needs beyond one training run.

``run(config, workdir)`` dispatches on ``config.recipe.procedure``:

* ``'train'``: one ``binax.train.train_and_evaluate`` run.
* ``'self_binarizing'`` (Lahoud & Achanta 2019): train with ``tanh(nu x)``, then evaluate
  the deployed network (``sign`` for tanh, BinaryBN thresholds for BN → sign) on the test
  set and report how often its predictions agree with the trained network at nu_max.
* ``'binaryduo'`` (Kim et al. ICLR 2020): train the coupled ternary network, decouple it
  into the binary network with 2x channels at the coupled layers, check on the test set
  that both compute the same logits, fine-tune the decoupled network, and report the
  three accuracies.

Each stage has its own workdir under ``workdir`` and resumes like any run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from binax import transforms
from binax.errors import ConfigError

__all__ = ["run", "predict", "binaryduo", "self_binarizing"]


def predict(model, variables: Mapping[str, Any], ds, batch_size: int = 1000, progress: float = 1.0):
    """Logits and labels of every test example (eval mode), as numpy arrays (``binax.train.evaluate``)."""
    from binax.train import evaluate

    result = evaluate(model, variables, ds.eval_batches(batch_size), progress=progress, keep_logits=True)
    return result.logits, result.labels


def _dataset(config):
    import binax.data

    return binax.data.create(config.data, seed=config.seed)


def _write(workdir: str, name: str, summary: dict) -> dict:
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return summary


def self_binarizing(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train a tanh(nu x) network, then evaluate it as sign + BinaryBN (the deployed form)."""
    from binax import train

    os.makedirs(workdir, exist_ok=True)
    final = train.train_and_evaluate(config, workdir)
    model, variables, _, _ = train.restore_variables(workdir, step="latest")
    ds = _dataset(config)
    trained_logits, labels = predict(model, variables, ds, config.eval_batch_size, progress=1.0)
    folded, fvars = transforms.self_binarizing_inference(model, variables, ds.image_shape)
    sign_logits, _ = predict(folded, fvars, ds, config.eval_batch_size)
    trained_pred, sign_pred = trained_logits.argmax(-1), sign_logits.argmax(-1)
    summary = {
        "test_accuracy": float(np.mean(sign_pred == labels)),
        "tanh_test_accuracy": float(np.mean(trained_pred == labels)),
        "agreement": float(np.mean(sign_pred == trained_pred)),
        "train_time_s": final.get("train_time_s"),
        "wall_time_s": final.get("wall_time_s"),
    }
    print(
        f"self-binarizing: tanh(nu_max) {100 * summary['tanh_test_accuracy']:.2f}%, sign + BinaryBN "
        f"{100 * summary['test_accuracy']:.2f}%, prediction agreement {100 * summary['agreement']:.2f}%",
        flush=True,
    )
    return _write(workdir, "recipe.json", summary)


def binaryduo(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """BinaryDuo's three stages: coupled ternary training → decoupling → fine-tuning."""
    from binax import train

    os.makedirs(workdir, exist_ok=True)
    coupled_dir = os.path.join(workdir, "coupled")
    decoupled_dir = os.path.join(workdir, "decoupled")
    coupled_final = train.train_and_evaluate(config, coupled_dir)
    model, variables, _, _ = train.restore_variables(coupled_dir, step="latest")
    dmodel, dvars, overrides = transforms.decouple_binaryduo_model(model, variables)

    ds = _dataset(config)
    coupled_logits, labels = predict(model, variables, ds, config.eval_batch_size)
    decoupled_logits, _ = predict(dmodel, dvars, ds, config.eval_batch_size)
    max_diff = float(np.max(np.abs(coupled_logits - decoupled_logits)))
    same_predictions = float(np.mean(coupled_logits.argmax(-1) == decoupled_logits.argmax(-1)))
    scale = float(np.max(np.abs(coupled_logits)))
    if same_predictions < 1.0 or max_diff > 1e-4 * max(1.0, scale):
        raise AssertionError(
            f"decoupled network differs from the coupled one: max |logit diff| {max_diff:.3g} "
            f"(logit scale {scale:.3g}), prediction agreement {same_predictions:.4f}"
        )

    ft = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        ft.model[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    ft.num_epochs = config.recipe.finetune_epochs
    ft.optimizer.learning_rate = config.optimizer.learning_rate * config.recipe.get("finetune_lr_factor", 0.1)
    ft.recipe.procedure = "train"
    final = train.train_and_evaluate(ft, decoupled_dir, init_variables=dvars)
    summary = {
        "coupled_test_accuracy": coupled_final["test_accuracy"],
        "decoupled_test_accuracy": float(np.mean(decoupled_logits.argmax(-1) == labels)),
        "test_accuracy": final["test_accuracy"],
        "decoupling_max_logit_diff": max_diff,
        "decoupling_prediction_agreement": same_predictions,
        "decoupled_widths": list(overrides.get("widths", ())),
        "train_time_s": (coupled_final.get("train_time_s") or 0) + (final.get("train_time_s") or 0),
        "wall_time_s": (coupled_final.get("wall_time_s") or 0) + (final.get("wall_time_s") or 0),
    }
    print(
        f"binaryduo: coupled (ternary) {100 * summary['coupled_test_accuracy']:.2f}%, decoupled "
        f"{100 * summary['decoupled_test_accuracy']:.2f}% (max |logit diff| {max_diff:.2g}), fine-tuned "
        f"{100 * summary['test_accuracy']:.2f}%",
        flush=True,
    )
    return _write(workdir, "recipe.json", summary)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run ``config``'s recipe (see the module docstring); returns its summary.

    The workdir is locked for the whole recipe, every stage included.
    """
    from binax import train
    from binax.train.workdir import lock_workdir

    procedure = config.get("recipe", {}).get("procedure", "train")
    if procedure not in PROCEDURES:
        raise ConfigError(f"unknown recipe procedure {procedure!r}; valid: {', '.join(PROCEDURES)}")
    train.maybe_initialize_distributed(config.get("distributed"))
    with lock_workdir(workdir, enabled=jax.process_index() == 0):
        return PROCEDURES[procedure](config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    from binax import train

    return train.train_and_evaluate(config, workdir)


PROCEDURES = {"train": _train, "self_binarizing": self_binarizing, "binaryduo": binaryduo}
