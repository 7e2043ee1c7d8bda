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

import flax.linen as nn
import jax

from binax import ops
from binax.errors import ConfigError
from binax.models import common
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


class VGG(common.BinaryModel):
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

    @nn.compact
    def __call__(self, x: Array, train: bool = False, progress: float | Array = 1.0) -> Array:
        common.check_image_input(x, type(self).__name__, self.min_input_size)
        k = self.kernel_size
        spec = common.layer_spec(self)
        widths = common.scaled(self.widths, self.width_multiplier)
        hidden = common.scaled(self.hidden_dense, self.width_multiplier)
        # Only a BN whose output a binarized layer consumes is a BN -> sign pair.
        n_bn = len(widths) + len(hidden)
        feeds_binary = [i < n_bn - 1 or not self.last_layer_float for i in range(n_bn)]
        foldable = [self.binary_bn and f for f in feeds_binary]
        for i, width in enumerate(widths):
            first = i == 0
            x = spec.conv(
                width,
                (k, k),
                name=f"conv{i}",
                quantize_input=not first,
                quantize_kernel=not (first and self.first_layer_float),
            )(x, progress)
            if i + 1 in self.pool_after:
                # binax.ops.max_pool: nn.max_pool's values and gradients, ~9% less CPU
                # per VGG-small step on XLA:CPU (docs/performance.md).
                x = ops.max_pool(x, (2, 2), strides=(2, 2))
            if feeds_binary[i]:
                x = common.replicate_units(x, self.replicate)
            x = common.bn_sign_block(self, x, train, f"bn{i}", foldable[i])
        x = x.reshape(x.shape[0], -1)
        for j, width in enumerate(hidden):
            x = spec.dense(width, name=f"fc{j}")(x, progress)
            if feeds_binary[len(widths) + j]:
                x = common.replicate_units(x, self.replicate)
            x = common.bn_sign_block(self, x, train, f"fc_bn{j}", foldable[len(widths) + j])
        x = common.apply_activation(self.classifier_activation, x, "classifier_act")
        return common.classifier(self, x, progress)

    def chain(self) -> list[common.Step] | None:
        if self.replicate != 1:
            # BinaryDuo's decoupled network copies channels between a layer and its BN, a
            # step the chain's readers (export's fused path, decoupling) do not model.
            return None
        Step = common.Step
        steps = []
        for i, _ in enumerate(self.widths):
            steps.append(Step.layer(f"conv{i}", ("widths", i), quantize_input=i > 0))
            if i + 1 in self.pool_after:
                steps.append(Step.max_pool((2, 2), (2, 2)))
            steps.append(Step.block(f"bn{i}"))
        steps.append(Step.flatten())
        for j, _ in enumerate(self.hidden_dense):
            steps += [Step.layer(f"fc{j}", ("hidden_dense", j)), Step.block(f"fc_bn{j}")]
        steps.append(Step.apply_activation(self.classifier_activation, "classifier_act"))
        return steps + [Step.layer("classifier", quantize_input=not self.last_layer_float)]
