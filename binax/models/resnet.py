"""Binary ResNets: ``resnet20``, ``resnet18_cifar`` (CIFAR), ``resnet18``, ``resnet34``
(ImageNet stems) and ``reactnet18``.

The residual unit wraps EVERY binary convolution (Bi-Real Net / IR-Net 1w1a):

    [shift] -> conv3x3 (input binarized by input_quantizer) -> BN -> + shortcut -> activation

A "basic block" is two such units; a stage's first unit has stride 2 (except the first
stage) and a downsampling shortcut:

* ``'A'``: parameter-free, ``x[:, ::2, ::2]`` with the new channels zero-padded half
  before, half after (He et al.'s option A, IR-Net's ResNet-20);
* ``'B'``: 1x1 conv (stride 2) -> BN;
* ``'avgpool'``: 2x2 average pool -> 1x1 conv -> BN (Bi-Real Net, ReActNet).

The 1x1 shortcut convolution is float unless ``binary_downsample=True``.

* ``resnet20`` (IR-Net ResNet-20 1w1a, CIFAR-10): stem conv3x3 16 -> BN -> hardtanh,
  stages 16/32/64 x 3 blocks, option A, units end in hardtanh, global pool -> BN1d -> FC;
  Libra-PB weights and EDE sign activations with T_min = 1e-3.
* ``resnet18_cifar`` (IR-Net CIFAR ResNet-18): stem conv3x3 64, stages 64..512 x 2
  blocks, option B.
* ``resnet18`` / ``resnet34`` (Bi-Real Net style, ImageNet): stem conv7x7/2 -> BN ->
  max-pool 3x3/2, stages (2,2,2,2) / (3,4,6,3), ``avgpool`` shortcuts, identity after the
  addition, approx_sign activations and XNOR-style mean|W|·sign(W) weights.
* ``reactnet18`` (ReActNet with a ResNet-18 backbone): ``resnet18`` plus a learned shift
  before every binary conv (RSign) and RPReLU after every addition.
"""

from __future__ import annotations

from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from binax import layers as L
from binax.errors import ConfigError
from binax.models import common
from binax.models.fields import Widths

Array = jax.Array


def _irnet(t_min: float) -> dict:
    """IR-Net 1w1a: Libra-PB weights, EDE sign activations, hardtanh, BN1d head."""
    ede = {"t_min": t_min, "t_max": 10.0}
    return dict(
        input_quantizer="ede_sign",
        input_quantizer_kwargs=ede,
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs=ede,
        activation="hardtanh",
        stem_activation="hardtanh",
        head_bn=True,
    )


def _bireal(stage_sizes) -> dict:
    """Bi-Real Net's ImageNet ResNet: approx_sign activations, XNOR-style weights."""
    return dict(
        stage_sizes=stage_sizes,
        stage_widths=(64, 128, 256, 512),
        stem="imagenet",
        shortcut="avgpool",
        num_classes=1000,
        input_quantizer="approx_sign",
        kernel_quantizer="xnor_weight",
    )


#: The registered names and how each differs from the fields' defaults.
PRESETS = {
    "resnet20": _irnet(t_min=1e-3),
    "resnet18_cifar": dict(stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512), shortcut="B")
    | _irnet(t_min=1e-3),
    "resnet18": _bireal((2, 2, 2, 2)),
    "resnet34": _bireal((3, 4, 6, 3)),
    "reactnet18": _bireal((2, 2, 2, 2)) | dict(learnable_shift=True, activation="rprelu"),
}


def _pad_channels(x: Array, features: int) -> Array:
    extra = features - x.shape[-1]
    if extra < 0:
        raise ConfigError(f"option-A shortcut cannot reduce channels ({x.shape[-1]} -> {features}).")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(extra // 2, extra - extra // 2)])


class ResidualUnit(nn.Module):
    """One binary conv with its own shortcut (see the module docstring)."""

    spec: common.LayerSpec
    features: int
    strides: int = 1
    shortcut: str = "A"
    binary_downsample: bool = False
    learnable_shift: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool, progress) -> Array:
        spec = self.spec
        shortcut = x
        if self.learnable_shift:
            x = L.LearnableShift(name="shift")(x)
        y = spec.conv(self.features, (3, 3), self.strides, name="conv")(x, progress)
        y = spec.batch_norm(train, "bn")(y)
        if self.strides != 1 or shortcut.shape[-1] != self.features:
            shortcut = self._downsample(shortcut, train, progress)
        y = y + shortcut
        return common.apply_activation(spec.activation, y, "act")

    def _downsample(self, x: Array, train: bool, progress) -> Array:
        spec, s = self.spec, self.strides
        if self.shortcut == "A":
            return _pad_channels(x[:, ::s, ::s, :], self.features)
        if self.shortcut == "avgpool":
            if s != 1:
                x = nn.avg_pool(x, (s, s), (s, s), padding="SAME", count_include_pad=False)
            conv_strides = 1
        else:
            conv_strides = s
        q = self.binary_downsample
        x = spec.conv(self.features, (1, 1), conv_strides, name="down_conv", quantize_input=q, quantize_kernel=q)(
            x, progress
        )
        return spec.batch_norm(train, "down_bn")(x)


class ResNet(common.BinaryModel):
    stage_sizes: Widths = (3, 3, 3)
    stage_widths: Widths = (16, 32, 64)
    stem: Literal["cifar", "imagenet"] = "cifar"
    stem_activation: common.Activation = "none"
    shortcut: Literal["A", "B", "avgpool"] = "A"
    # The 1x1 shortcut convolution binarized (float by default).
    binary_downsample: bool = False
    # ReActNet's RSign: a learned per-channel shift before every binary conv.
    learnable_shift: bool = False
    # Batch norm on the pooled features before the classifier (IR-Net's BN1d).
    head_bn: bool = False

    @property
    def min_input_size(self) -> int:
        return 32 if self.stem == "imagenet" else 8

    @staticmethod
    def validate_config(cfg) -> None:
        if len(cfg["stage_sizes"]) != len(cfg["stage_widths"]):
            raise ConfigError(
                f"stage_sizes {cfg['stage_sizes']} and stage_widths {cfg['stage_widths']} must have the same length."
            )

    @nn.compact
    def __call__(self, x: Array, train: bool = False, progress: float | Array = 1.0) -> Array:
        common.check_image_input(x, type(self).__name__, self.min_input_size)
        spec = common.layer_spec(self)
        widths = common.scaled(self.stage_widths, self.width_multiplier)
        k, s0 = ((7, 7), 2) if self.stem == "imagenet" else ((3, 3), 1)
        stem = spec.conv(
            widths[0], k, s0, name="stem_conv", quantize_input=False, quantize_kernel=not self.first_layer_float
        )
        x = stem(x, progress)
        x = spec.batch_norm(train, "stem_bn")(x)
        x = common.apply_activation(self.stem_activation, x, "stem_act")
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, widths)):
            for b in range(blocks):
                for u in range(2):
                    strides = 2 if (s > 0 and b == 0 and u == 0) else 1
                    x = ResidualUnit(
                        spec,
                        width,
                        strides,
                        self.shortcut,
                        self.binary_downsample,
                        self.learnable_shift,
                        name=f"stage{s}_block{b}_unit{u}",
                    )(x, train, progress)
        x = jnp.mean(x, axis=(1, 2))
        if self.head_bn:
            x = spec.batch_norm(train, "head_bn")(x)
        return common.classifier(self, x, progress)
