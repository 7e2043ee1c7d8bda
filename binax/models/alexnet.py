"""Binary AlexNet (XNOR-Net / BinaryDuo layout, ImageNet).

conv11x11/4 (pad 2) -> max-pool 3x3/2 -> BN -> act; conv5x5 (pad 2) -> pool -> BN -> act;
conv3x3 x 3 (pad 1) with a pool after the last; each followed by BN -> act; flatten
(6x6x256 at 224x224) -> [dense -> BN -> act] x 2 -> classifier. Pooling precedes the batch
norm as in BinaryDuo's AlexNet (which writes the first dense layer as a 6x6 convolution,
the same map). Widths follow the original AlexNet (96-256-384-384-256, 4096-4096);
BinaryDuo's narrower coupled model is ``conv_widths=(88, 192, 256, 256, 192),
fc_widths=(2400, 4096)``. Needs at least 63x63 inputs.
"""

from __future__ import annotations

import jax

from binax.errors import ConfigError
from binax.models import common, sequential
from binax.models.fields import Widths

Array = jax.Array


#: The registered name and how it differs from the fields' defaults.
PRESETS = {"alexnet": dict(num_classes=1000, latent_weight_clip=1.0)}


# (kernel, stride, padding, pool after) of the five convolutions.
_CONVS = ((11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True))


class AlexNet(sequential.SequentialModel):
    conv_widths: Widths = (96, 256, 384, 384, 256)
    fc_widths: Widths = (4096, 4096)

    @property
    def min_input_size(self) -> int:
        return 63  # the smallest input whose last max-pool still sees a 3x3 window

    @staticmethod
    def validate_config(cfg) -> None:
        if len(cfg["conv_widths"]) != len(_CONVS):
            raise ConfigError(f"AlexNet has {len(_CONVS)} convolutions; got conv_widths={cfg['conv_widths']}.")

    def steps(self) -> list[common.Step]:
        """Per convolution: conv -> [3x3/2 max-pool] -> BN block; flatten; dense -> BN
        blocks; the classifier."""
        Step = common.Step
        steps = []
        for i, (k, s, p, pool) in enumerate(_CONVS):
            first = i == 0
            no_kq = first and self.first_layer_float
            steps.append(Step.conv(f"conv{i}", ("conv_widths", i), (k, k), s, p, quantize_input=not first, quantize_kernel=not no_kq))
            if pool:
                steps.append(Step.max_pool((3, 3), (2, 2)))
            steps.append(Step.block(f"bn{i}"))
        steps.append(Step.flatten())
        for j, _ in enumerate(self.fc_widths):
            steps += [Step.layer(f"fc{j}", ("fc_widths", j)), Step.block(f"fc_bn{j}")]
        return steps + [sequential.classifier_step(self)]
