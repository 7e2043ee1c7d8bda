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

from binax.errors import ConfigError
from binax.models import common
from binax.models.fields import Count, Widths

Array = jax.Array


#: The registered name and how it differs from the fields' defaults (BNN clips latent weights).
PRESETS = {"bnn_mlp": dict(latent_weight_clip=1.0)}


class MLP(common.BinaryModel):
    """Dense -> BN -> sign stack; flattens any (N, ...) input."""

    widths: Widths = (2048, 2048, 2048)
    # BN -> sign as BinaryBatchNorm threshold layers (inference after folding).
    binary_bn: bool = False
    # Copies of each output unit of every layer whose BN feeds a binarized layer
    # (BinaryDuo's decoupled network: 2, weights tied; see common.replicate_units).
    replicate: Count = 1

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
            feeds_binary = i < len(widths) - 1 or not self.last_layer_float
            x = spec.dense(
                width, name=f"fc{i}", quantize_input=not first, quantize_kernel=not (first and self.first_layer_float)
            )(x, progress)
            if feeds_binary:
                x = common.replicate_units(x, self.replicate)
            x = common.bn_sign_block(self, x, train, f"bn{i}", self.binary_bn and feeds_binary)
        return common.classifier(self, x, progress)

    def chain(self) -> list[common.Step] | None:
        if self.replicate != 1:
            # BinaryDuo's decoupled network copies channels between a layer and its BN, a
            # step the chain's readers (export's fused path, decoupling) do not model.
            return None
        Step = common.Step
        steps = [Step.flatten()]
        for i, _ in enumerate(self.widths):
            steps += [Step.layer(f"fc{i}", ("widths", i), quantize_input=i > 0), Step.block(f"bn{i}")]
        return steps + [Step.layer("classifier", quantize_input=not self.last_layer_float)]
