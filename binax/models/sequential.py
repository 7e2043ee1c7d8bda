"""Sequential models: the forward written once, as a list of steps.

A sequential model (``bnn_mlp``, the VGG family, ``alexnet``) lists its forward as
:class:`binax.models.common.Step` objects in :meth:`SequentialModel.steps`; its
``__call__`` runs them (:func:`run_steps`) and its :meth:`~SequentialModel.chain` hands
the same list to the readers of layer chains (the packed exporter, BinaryDuo
decoupling). The layer order is therefore written in one place, and what the exporter
reads is what the model runs.

Between a layer and the batch norm that follows it, the step runner adds what depends
on where that batch norm's output goes: a BN whose output a binarized layer reads is
copied ``replicate`` times (BinaryDuo's decoupled network, :func:`common.replicate_units`)
and, with ``binary_bn``, folded into a BinaryBatchNorm (:func:`common.bn_sign_block`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from binax import ops
from binax.errors import ConfigError
from binax.models import common
from binax.models.common import Step

Array = jax.Array

__all__ = ["SequentialModel", "run_steps", "classifier_step"]


def classifier_step(model: common.BinaryModel) -> Step:
    """The last dense layer (float unless ``last_layer_float=False``), with a bias."""
    q = not model.last_layer_float
    return Step.layer("classifier", features=model.num_classes, quantize_input=q, quantize_kernel=q, use_bias=True)


def _features(model: common.BinaryModel, step: Step) -> int:
    if step.width is None:
        if step.features is None:
            raise ConfigError(f"chain step {step.path} names neither a width key nor its features.")
        return step.features
    key, index = step.width
    return common.scaled(getattr(model, key), model.width_multiplier)[index]


def _layer(model: common.BinaryModel, spec: common.LayerSpec, step: Step) -> nn.Module:
    kw = dict(name=step.path[-1], quantize_input=step.quantize_input, quantize_kernel=step.quantize_kernel, use_bias=step.use_bias)
    if step.window:
        return spec.conv(_features(model, step), step.window, step.strides, step.padding, **kw)
    return spec.dense(_features(model, step), **kw)


def _feeds_binary(steps: Sequence[Step], i: int) -> bool:
    """Whether the block at ``i`` feeds a layer that binarizes its input."""
    after = next((s for s in steps[i + 1 :] if s.kind == "layer"), None)
    return after is not None and after.quantize_input


def run_steps(model: common.BinaryModel, steps: Sequence[Step], x: Array, train: bool, progress) -> Array:
    """Runs ``steps`` in the scope of ``model`` (call from its compact ``__call__``)."""
    spec = common.layer_spec(model)
    for i, step in enumerate(steps):
        if step.kind == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif step.kind == "layer":
            x = _layer(model, spec, step)(x, progress)
        elif step.kind == "max_pool":
            # binax.ops.max_pool: nn.max_pool's values and gradients, ~9% less CPU per
            # VGG-small step on XLA:CPU for non-overlapping windows (docs/performance.md).
            x = ops.max_pool(x, step.window, strides=step.strides, padding=step.padding)
        elif step.kind == "block":
            feeds = _feeds_binary(steps, i)
            if feeds:
                x = common.replicate_units(x, getattr(model, "replicate", 1))
            x = common.bn_sign_block(model, x, train, step.path[-1], getattr(model, "binary_bn", False) and feeds)
        elif step.kind == "activation":
            x = common.apply_activation(step.activation, x, step.path[-1])
        else:
            raise ConfigError(f"unknown chain step kind {step.kind!r}.")
    return x


class SequentialModel(common.BinaryModel):
    """A model whose forward is :meth:`steps`, run in order."""

    def steps(self) -> list[Step]:
        """The forward as :class:`Step` objects (each family writes its own)."""
        raise NotImplementedError

    def check_input(self, x: Array) -> None:
        """CNNs: NHWC batches whose spatial size survives the model's downsampling."""
        common.check_image_input(x, type(self).__name__, self.min_input_size)

    def chain(self) -> list[Step] | None:
        if getattr(self, "replicate", 1) != 1:
            # BinaryDuo's decoupled network copies channels between a layer and its BN, a
            # step the chain's readers (export's fused path, decoupling) do not model.
            return None
        return self.steps()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, progress: float | Array = 1.0) -> Array:
        self.check_input(x)
        return run_steps(self, self.steps(), x, train, progress)
