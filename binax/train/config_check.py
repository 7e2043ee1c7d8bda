"""The whole training config checked before a run touches its workdir.

:func:`validate` looks at every key ``train_and_evaluate`` reads and raises one
:class:`~binax.errors.ConfigError` whose one line names each bad key, its value and what
is allowed. It runs before the workdir is created or locked, so a rejected config leaves
nothing behind. The model block is checked against its model's fields
(:func:`binax.models.problems`: each field's declaration says what it allows). It checks
values, not the data: the dataset's name and files, and the model's class count against
them, are checked when the data is loaded.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator

import ml_collections

import binax.models
from binax.errors import ConfigError
from binax.train import optimizers, steps

__all__ = ["validate", "problems"]

PROGRESS_UNITS = ("epoch", "step")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and v >= low else f"an integer >= {low}"


def _real_in(low: float, high: float = math.inf, *, low_open=False, high_open=True) -> Callable[[Any], str | None]:
    def check(v):
        if _is_real(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high):
            return None
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        return f"a finite number in {left}{low:g}, {high:g}{right}"

    return check


def _one_of(values) -> Callable[[Any], str | None]:
    return lambda v: None if v in values else f"one of {', '.join(repr(x) for x in values)}"


def _boolean(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def _optional(check):
    return lambda v: None if v is None else check(v)


# Top-level keys: key -> check (a message of what is allowed, or None when the value is fine).
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "seed": _int_at_least(0),
    "num_epochs": _int_at_least(1),
    "max_steps_per_epoch": _optional(_int_at_least(1)),
    "grad_clip_norm": _real_in(0.0),
    "label_smoothing": _real_in(0.0, 1.0),
    "progress_unit": _one_of(PROGRESS_UNITS),
    "latent_weight_clip": _optional(_real_in(0.0, low_open=True)),
    "compute_dtype": _one_of(tuple(steps.COMPUTE_DTYPES)),
    "log_every_steps": _int_at_least(1),
    "report_every_seconds": _real_in(0.0),
    "eval_every_epochs": _int_at_least(0),
    "data.validation_holdout": _int_at_least(0),
    "checkpoint.every_steps": _int_at_least(0),
    "checkpoint.keep": _int_at_least(1),
    "checkpoint.async_save": _boolean,
    "distributed.num_processes": _int_at_least(1),
    "distributed.process_id": _int_at_least(0),
    "distributed.auto": _boolean,
}

_OPTIMIZER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "schedule": _one_of(optimizers.SCHEDULES),
    "warmup_epochs": _real_in(0.0),
    "end_factor": _real_in(0.0),
    "step_factor": _real_in(0.0, low_open=True),
    "momentum": _real_in(0.0, 1.0),
    "b1": _real_in(0.0, 1.0),
    "b2": _real_in(0.0, 1.0),
    "eps": _real_in(0.0),
    "weight_decay": _real_in(0.0),
    "threshold": _real_in(0.0),
}


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _optimizer_problems(prefix: str, spec, *, required: bool) -> Iterator[str]:
    if spec is _MISSING:
        return
    name = spec.get("name", "")
    if not required and name == "":
        return  # binary_optimizer.name '' : every parameter uses config.optimizer
    names = optimizers.OPTIMIZERS if required else ("",) + optimizers.OPTIMIZERS
    bad = _one_of(names)(name)
    if bad:
        yield f"{prefix}.name={name!r} must be {bad}"
        return
    # Bop has no learning rate (its schedule scales gamma).
    rate_key = "gamma" if name == "bop" else "learning_rate"
    rate = spec.get(rate_key)
    if not (_is_real(rate) and rate > 0):
        yield f"{prefix}.{rate_key}={rate!r} must be a finite number > 0"
    for key, check in _OPTIMIZER_CHECKS.items():
        if key in spec:
            bad = check(spec[key])
            if bad:
                yield f"{prefix}.{key}={spec[key]!r} must be {bad}"
    if spec.get("schedule") == "step":
        epochs = spec.get("step_epochs", ())
        if not isinstance(epochs, (tuple, list)) or not epochs or not all(_is_real(e) and e >= 0 for e in epochs):
            yield f"{prefix}.step_epochs={epochs!r} must be a non-empty sequence of epochs >= 0 for schedule='step'"


def _model_problems(model) -> Iterator[str]:
    values = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
    name = values.pop("name", None)
    try:
        yield from binax.models.problems(name, values, prefix="model.")
    except ConfigError as e:  # the registry's message lists the valid names
        yield f"model.name: {str(e).rstrip('.')}"


def problems(config: ml_collections.ConfigDict, num_devices: int = 1) -> list[str]:
    """Every violation in ``config``, one sentence each (empty when the config is fine)."""
    out = []
    for key, check in _CHECKS.items():
        value = _get(config, key)
        if value is _MISSING:
            continue
        bad = check(value)
        if bad:
            out.append(f"{key}={value!r} must be {bad}")
    for key in ("batch_size", "eval_batch_size"):
        value = _get(config, key)
        if value is not _MISSING and not (_is_int(value) and value >= 1 and value % num_devices == 0):
            out.append(
                f"{key}={value} must be a positive multiple of the {num_devices} devices "
                "(each device gets an equal share of the batch)"
            )
    out.extend(_optimizer_problems("optimizer", _get(config, "optimizer"), required=True))
    out.extend(_optimizer_problems("binary_optimizer", _get(config, "binary_optimizer"), required=False))
    model = _get(config, "model")
    if model is not _MISSING:
        out.extend(_model_problems(model))
    return out


def validate(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises :class:`~binax.errors.ConfigError` listing every violation in one line."""
    found = problems(config, num_devices)
    if found:
        raise ConfigError("; ".join(found) + ".")
