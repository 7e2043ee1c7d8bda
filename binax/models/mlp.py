"""Binary multi-layer perceptron: ``bnn_mlp`` (BNN, Hubara/Courbariaux et al. 2016).

784-2048-2048-2048-10: every hidden layer is Dense -> BatchNorm -> (activation), and the
next layer's input binarizer is the sign (BNN's Dense -> BN -> sign). The first layer's
input is the pixels (never binarized); with ``first_layer_float`` its weights stay float
too (the BNN paper binarized them: set ``first_layer_float=False``). The classifier is
float with a bias unless ``last_layer_float=False``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from binax.errors import ConfigError
from binax.models import common

Array = jax.Array


def get_config() -> ml_collections.ConfigDict:
    c = common.base_config()
    c.widths = (2048, 2048, 2048)
    c.latent_weight_clip = 1.0
    # BN -> sign as BinaryBatchNorm threshold layers (inference after folding).
    c.binary_bn = False
    return c


class MLP(common.BinaryModel):
    """Dense -> BN -> sign stack; flattens any (N, ...) input."""

    widths: tuple[int, ...] = (2048, 2048, 2048)
    binary_bn: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False, progress: float | Array = 1.0) -> Array:
        if x.ndim < 2:
            raise ConfigError(f"MLP expects a batch (N, ...) of rank >= 2; got shape {tuple(x.shape)}.")
        x = x.reshape(x.shape[0], -1)
        spec = common.layer_spec(self)
        widths = common.scaled(self.widths, self.width_multiplier)
        for i, width in enumerate(widths):
            first = i == 0
            # The last BN feeds the classifier, binarized only when it is not float.
            foldable = self.binary_bn and (i < len(widths) - 1 or not self.last_layer_float)
            x = spec.dense(
                width, name=f"fc{i}", quantize_input=not first, quantize_kernel=not (first and self.first_layer_float)
            )(x, progress)
            x = common.bn_sign_block(self, x, train, f"bn{i}", foldable)
        return common.classifier(self, x, progress)

    def chain(self) -> list[common.Step]:
        Step = common.Step
        steps = [Step.flatten()]
        for i, _ in enumerate(self.widths):
            steps += [Step.layer(f"fc{i}", ("widths", i), quantize_input=i > 0), Step.block(f"bn{i}")]
        return steps + [Step.layer("classifier", quantize_input=not self.last_layer_float)]
