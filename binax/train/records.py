"""What a run records as it trains: the per-update metrics since the last record (checked
finite, saved with every checkpoint), the averaged train record, the latent-weight
histograms. Pure functions of their arguments but for the one host fetch of the metrics.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

from binax import layers
from binax.errors import NonFiniteError
from binax.train import checkpoints as ckpt_lib

__all__ = ["FINITE_METRICS", "MetricWindow", "train_record", "latent_weights", "top5_text"]

# Per-update metrics that must stay finite; a record or checkpoint stops the run otherwise.
FINITE_METRICS = ("loss", "grad_norm", "update_norm", "param_norm")


def _mean(values) -> float:
    return float(np.mean(np.asarray(values, np.float64)))


def top5_text(accuracy: float | None) -> str:
    """`` (top-5 xx.xx%)`` for the progress lines, or nothing for a model without top-5."""
    return "" if accuracy is None else f" (top-5 {100 * accuracy:.2f}%)"


class MetricWindow:
    """The per-update metrics since the last record: device scalars, fetched on demand.

    Saved with every checkpoint (as host floats), so a resumed run continues the window
    that was open and its next record averages the same updates as an uninterrupted run.
    """

    def __init__(self, first_step: int, pending=()):
        self.first_step = first_step  # the step the window's first update produced
        self.items: list[Mapping[str, Any]] = list(pending)

    def append(self, metrics: Mapping[str, Any]) -> None:
        self.items.append(metrics)

    def __len__(self) -> int:
        return len(self.items)

    def host(self) -> list[dict[str, float]]:
        """The metrics as host floats (fetched once, in one transfer)."""
        fetched = jax.device_get(self.items)
        self.items = [{k: float(v) for k, v in m.items()} for m in fetched]
        return self.items

    def check_finite(self, where: Callable[[], str]) -> None:
        """Raises :class:`NonFiniteError` at the first update with a non-finite loss,
        gradient, update or parameter norm; ``where()`` names the checkpoint to go back to
        (called only then: it waits for a pending save)."""
        for i, m in enumerate(self.host()):
            bad = {k: m[k] for k in FINITE_METRICS if k in m and not math.isfinite(m[k])}
            if bad:
                step = self.first_step + i
                what = ", ".join(f"{k} is {v}" for k, v in bad.items())
                if "loss" not in bad:
                    what = f"loss is {m['loss']:.4g} but {what}"
                raise NonFiniteError(
                    f"training {what} at step {step} (update {step - 1}); the last checkpoint to go "
                    f"back to is {where()}. Change the config (e.g. a lower learning rate) and rerun with "
                    "the same --workdir to resume there."
                )

    def record(self) -> dict[str, float]:
        """Means over the window (the parameter norm: its last value)."""
        items = self.host()
        out = {}
        for key in items[0]:
            values = [m[key] for m in items]
            if key == "param_norm":
                out["train/param_norm"] = values[-1]
            elif key.startswith("flip_ratio"):
                out[key] = _mean(values)
            else:
                out[f"train/{key}"] = _mean(values)
        return out

    def restart(self, first_step: int) -> None:
        self.first_step, self.items = first_step, []


def train_record(
    window: MetricWindow,
    step: int,
    *,
    learning_rates: Mapping[str, Any],
    progress: float,
    steps_per_epoch: int,
    batch_size: int,
    scalars: Mapping[str, float],
    clock: tuple[int, float],
    now: float,
) -> dict[str, float]:
    """The record at ``step``: the window's means, the learning rates and progress of the
    last update, the epoch, the schedules' ``scalars`` (EDE's t and k, tanh's nu...), and
    the throughput since ``clock = (step, time)`` of the last record."""
    record = window.record()
    record.update({k: float(v) for k, v in jax.device_get(learning_rates).items()})
    record["progress"] = progress
    record["epoch"] = step / steps_per_epoch
    record.update(scalars)
    elapsed = now - clock[1]
    if elapsed > 0 and step > clock[0]:
        record["perf/steps_per_sec"] = (step - clock[0]) / elapsed
        record["perf/examples_per_sec"] = record["perf/steps_per_sec"] * batch_size
    return record


def latent_weights(params) -> dict[str, np.ndarray]:
    """``{'latent_weights/<layer>': latent kernel}`` on the host, for histograms."""
    out = {}
    for path, w in jax.tree_util.tree_leaves_with_path(params):
        if layers.is_latent_kernel_path(path):
            out["latent_weights/" + ckpt_lib.path_name(path[:-1])] = ckpt_lib.host_copy(w)
    return out
