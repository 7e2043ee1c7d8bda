"""What a run shows in TensorBoard besides its losses: the binarizers' schedule values and
the pre-activations that a sign binarizes.

* :func:`schedule_scalars`: EDE's ``t`` and ``k``, tanh's ``nu``, ... at a progress, for
  every quantizer of the model that has a ``schedule`` in its descriptor
  (``binax.quantizer``), as ``schedule/<quantizer>/<value>``. Nothing here names a
  binarizer: a registered one with a schedule is logged like a built-in one.
* :class:`PreActivations`: the input of every layer whose input quantizer is 1-bit (what
  its sign sees, where the estimator's gradient mismatch lives: IR-Net, Bi-Real and
  ReActNet plot these distributions), sampled on one small fixed batch at a record, as
  ``pre_activations/<layer>`` histograms. One jitted apply on host copies of the
  variables, so any process count and device layout gives the same picture.

Modules are found with ``binax.models`` tracing and asked for their quantizers through
their fields named ``*_quantizer`` (with ``*_quantizer_kwargs``), as the summary asks
layers rather than listing layer types.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from binax import models, quantizer
from binax.train import checkpoints as ckpt_lib

__all__ = ["schedule_scalars", "quantizers_of", "PreActivations"]


def quantizers_of(module) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    """``{field: (spec, kwargs)}`` for every quantizer field of a module that is set: the
    layers' ``*_quantizer`` fields and a standalone activation's ``binarizer`` (ReActNet's
    ``RSign``)."""
    if not dataclasses.is_dataclass(module):
        return {}
    out = {}
    for field in dataclasses.fields(module):
        if field.name.endswith("_quantizer") or field.name == "binarizer":
            spec = getattr(module, field.name)
            if spec is not None:
                out[field.name] = (spec, getattr(module, field.name + "_kwargs", None) or {})
    return out


def _layer_calls(calls: Sequence[models.Call]) -> list[models.Call]:
    """The calls of modules that call no other module: the layers that apply quantizers
    (a model or block may hold ``*_quantizer`` settings it passes on to them)."""
    paths = {c.path for c in calls}
    return [c for c in calls if not any(len(p) > len(c.path) and p[: len(c.path)] == c.path for p in paths)]


def schedule_scalars(calls: Sequence[models.Call], progress: float) -> dict[str, float]:
    """``{'schedule/<quantizer>/<value>': v}`` at ``progress`` for the scheduled quantizers
    of ``calls`` (:func:`binax.models.trace`). Layers sharing a quantizer and its schedule
    settings share one scalar; settings that differ get the first layer's path too."""
    seen: dict[tuple, str] = {}
    out: dict[str, float] = {}
    for call in _layer_calls(calls):
        for spec, kwargs in quantizers_of(call.module).values():
            values = quantizer.schedule_values(spec, kwargs, progress)
            if not values:
                continue
            name = quantizer.describe(spec).name
            key = (name, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if key not in seen:
                taken = any(n == name for n, _ in seen)
                seen[key] = f"schedule/{name}" + (f"/{'/'.join(call.path)}" if taken else "")
            out.update({f"{seen[key]}/{k}": v for k, v in values.items()})
    return out


def binarized_inputs(calls: Sequence[models.Call]) -> list[tuple[str, ...]]:
    """Paths of the layers whose input quantizer is 1-bit (a sign of the input)."""
    paths = []
    for call in _layer_calls(calls):
        spec, _ = quantizers_of(call.module).get("input_quantizer", (None, None))
        if spec is not None and quantizer.describe(spec).bits == 1 and call.path not in paths:
            paths.append(call.path)
    return paths


class PreActivations:
    """Samples the input of every binarized activation on one fixed batch.

    ``images``: the batch (a few hundred examples is plenty for a histogram), kept on the
    host; ``calls``: the model's :func:`binax.models.trace`.
    """

    def __init__(self, model, calls: Sequence[models.Call], images: np.ndarray):
        self.paths = binarized_inputs(calls)
        self.images = np.asarray(images)
        wanted = set(self.paths)

        def sample(variables, x, progress):
            with models.record_calls(keep_inputs=True) as seen:
                model.apply(variables, x, train=False, progress=progress)
            out = {}
            for call in seen:
                if call.path in wanted and call.path not in out:  # a repeated call: its first
                    out[call.path] = call.input
            return out

        self._sample = jax.jit(sample)

    def __call__(self, variables: Mapping[str, Any], progress: float) -> dict[str, np.ndarray]:
        """``{'pre_activations/<layer>': values}`` on the host."""
        if not self.paths:
            return {}
        host = jax.tree.map(ckpt_lib.host_copy, dict(variables))
        got = self._sample(host, self.images, np.float32(progress))
        return {"pre_activations/" + "/".join(path): np.asarray(v) for path, v in got.items()}


class RunProbes:
    """A training run's probes, built from its model and the first ``batch_size`` test
    examples (the fixed batch of :class:`PreActivations`)."""

    def __init__(self, model, eval_batches, batch_size: int = 256):
        batch = next(iter(eval_batches))
        images = np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0][:batch_size]
        self.calls, _ = models.trace(model, images.shape[1:])
        self.pre_activations = PreActivations(model, self.calls, images)

    def scalars(self, progress: float) -> dict[str, float]:
        return schedule_scalars(self.calls, progress)

    def histograms(self, variables: Mapping[str, Any], progress: float) -> dict[str, np.ndarray]:
        return self.pre_activations(variables, progress)
