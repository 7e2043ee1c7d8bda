"""Binary multi-layer perceptron: ``bnn_mlp`` (BNN, Hubara/Courbariaux et al. 2016).

784-2048-2048-2048-10: every hidden layer is Dense -> BatchNorm -> (activation), and the
next layer's input binarizer is the sign (BNN's Dense -> BN -> sign). The first layer's
input is the pixels (never binarized); with ``first_layer_float`` its weights stay float
too (the BNN paper binarized them: set ``first_layer_float=False``). The classifier is
float with a bias unless ``last_layer_float=False``.
"""

from __future__ import annotations

import jax

from binax.errors import ConfigError
from binax.models import common, sequential
from binax.models.fields import Count, Widths

Array = jax.Array


#: The registered name and how it differs from the fields' defaults (BNN clips latent weights).
PRESETS = {"bnn_mlp": dict(latent_weight_clip=1.0)}


class MLP(sequential.SequentialModel):
    """Dense -> BN -> sign stack; flattens any (N, ...) input."""

    widths: Widths = (2048, 2048, 2048)
    # BN -> sign as BinaryBatchNorm threshold layers (inference after folding).
    binary_bn: bool = False
    # Copies of each output unit of every layer whose BN feeds a binarized layer
    # (BinaryDuo's decoupled network: 2, weights tied; see common.replicate_units).
    replicate: Count = 1

    def check_input(self, x: Array) -> None:
        if x.ndim < 2:
            raise ConfigError(f"MLP expects a batch (N, ...) of rank >= 2; got shape {tuple(x.shape)}.")

    def steps(self) -> list[common.Step]:
        """flatten, then per width: dense -> BN block; the classifier."""
        Step = common.Step
        steps = [Step.flatten()]
        for i, _ in enumerate(self.widths):
            first = i == 0
            fc = Step.layer(f"fc{i}", ("widths", i), quantize_input=not first, quantize_kernel=not (first and self.first_layer_float))
            steps += [fc, Step.block(f"bn{i}")]
        return steps + [sequential.classifier_step(self)]
