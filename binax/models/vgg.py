"""VGG-style binary CNNs: ``cnn_small``, ``vgg_small``, ``vgg7_tiny``.

Block ``i``: conv3x3 (SAME) -> [2x2 max-pool if ``i+1`` in ``pool_after``] -> BN ->
activation, pooling before the batch norm as IR-Net's and LQ-Nets' VGG-small do. Then
flatten -> hidden dense layers (dense -> BN -> activation) -> ``classifier_activation`` ->
classifier.

* ``vgg_small`` (LQ-Nets / IR-Net, CIFAR-10): 128-128-256-256-512-512, pools after the
  2nd, 4th and 6th conv, then FC 512*4*4 -> 10.
* ``cnn_small``: 32-32-64-64 with pools after the 2nd and 4th conv, the Fashion-MNIST
  default CNN for recipes (28x28 -> 7x7x64 -> 10).
* ``vgg7_tiny`` (BinaryDuo's tiny VGG-7 for CIFAR-10, read from the paper's Torch7 code):
  45-45-90-90 convs with pools after the 2nd, 3rd and 4th, a 4x4 conv to 336 (on a 4x4
  map, i.e. a dense layer over the flattened map), a 1x1 conv to 512 followed by ReLU,
  and the classifier. BinaryDuo's activations are ``duo_binary``/``duo_ternary`` on the BN
  output, BinaryDuo weights ``duo_weight``.
"""

from __future__ import annotations

import jax

from binax.errors import ConfigError
from binax.models import common, sequential
from binax.models.fields import Count, Widths

Array = jax.Array


#: The registered names and how each differs from the fields' defaults.
PRESETS = {
    # BNN-style (ste_sign on weights and activations, latent clip 1) 4-conv CNN.
    "cnn_small": dict(widths=(32, 32, 64, 64), pool_after=(2, 4), latent_weight_clip=1.0),
    # IR-Net VGG-small 1w1a: Libra-PB weights, EDE sign activations, hardtanh.
    "vgg_small": dict(
        input_quantizer="ede_sign",
        input_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0},
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0},
        activation="hardtanh",
    ),
    # BinaryDuo tiny VGG-7 with the coupled ternary activation (duo_ternary) and duo_weight.
    "vgg7_tiny": dict(
        widths=(45, 45, 90, 90),
        pool_after=(2, 3, 4),
        hidden_dense=(336, 512),
        classifier_activation="relu",
        input_quantizer="duo_ternary",
        kernel_quantizer="duo_weight",
    ),
}


class VGG(sequential.SequentialModel):
    widths: Widths = (128, 128, 256, 256, 512, 512)
    # 1-based convolutions followed by a 2x2 max-pool.
    pool_after: Widths = (2, 4, 6)
    hidden_dense: Widths = ()
    kernel_size: Count = 3
    classifier_activation: common.Activation = "none"
    # BN -> sign as BinaryBatchNorm threshold layers (inference after folding).
    binary_bn: bool = False
    # Copies of each output channel of every layer whose BN feeds a binarized layer
    # (BinaryDuo's decoupled network: 2, weights tied; see common.replicate_units).
    replicate: Count = 1

    @property
    def min_input_size(self) -> int:
        return 2 ** len(self.pool_after)

    @staticmethod
    def validate_config(cfg) -> None:
        bad = [i for i in cfg["pool_after"] if not 1 <= i <= len(cfg["widths"])]
        if bad:
            raise ConfigError(
                f"pool_after {cfg['pool_after']} names convolutions {bad} that do not exist "
                f"(1..{len(cfg['widths'])} for widths {cfg['widths']})."
            )

    def steps(self) -> list[common.Step]:
        """Per width: conv -> [2x2 max-pool] -> BN block; flatten; hidden dense -> BN
        blocks; the classifier activation; the classifier."""
        Step = common.Step
        k = self.kernel_size
        steps = []
        for i, _ in enumerate(self.widths):
            first = i == 0
            no_kq = first and self.first_layer_float
            steps.append(Step.conv(f"conv{i}", ("widths", i), (k, k), quantize_input=not first, quantize_kernel=not no_kq))
            if i + 1 in self.pool_after:
                steps.append(Step.max_pool((2, 2), (2, 2)))
            steps.append(Step.block(f"bn{i}"))
        steps.append(Step.flatten())
        for j, _ in enumerate(self.hidden_dense):
            steps += [Step.layer(f"fc{j}", ("hidden_dense", j)), Step.block(f"fc_bn{j}")]
        steps.append(Step.apply_activation(self.classifier_activation, "classifier_act"))
        return steps + [sequential.classifier_step(self)]
