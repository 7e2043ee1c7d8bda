"""Pieces shared by the model families: the quantization settings every model takes,
layer factories that turn them into binary / float / ABC layers, activations, input checks.

Every model is a Flax Linen module whose dataclass fields are exactly the keys of its
default ``ml_collections.ConfigDict`` (``binax.models.get_config(name)``, made from the
fields by :mod:`binax.models.fields`), called as
``model.apply(variables, x, train=bool, progress=p, mutable=[...])``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.core import FrozenDict

from binax import layers as L
from binax.errors import ConfigError
from binax.models.fields import Count, Fraction, Keywords, Positive, QuantizerSpec, Real

Array = jax.Array

LayerType = Literal["binary", "abc"]
Activation = Literal["none", "hardtanh", "relu", "tanh", "rprelu"]
ACTIVATIONS = typing.get_args(Activation)


def freeze(value: Any) -> Any:
    """Config values as hashable module fields: dicts -> FrozenDict, lists -> tuples."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def scaled(widths: Sequence[int], multiplier: float) -> tuple[int, ...]:
    """Widths times ``multiplier``, rounded, at least 1."""
    return tuple(max(1, int(round(w * multiplier))) for w in widths)


def activation_fn(name: str | None) -> Callable[[Array], Array] | None:
    """Parameter-free activations by name; None for 'none' (and for 'rprelu', a module)."""
    name = "none" if name is None else name
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}.")
    return {
        "none": None,
        "hardtanh": lambda x: jnp.clip(x, -1.0, 1.0),
        "relu": nn.relu,
        "tanh": jnp.tanh,
        "rprelu": None,
    }[name]


def apply_activation(name: str | None, x: Array, module_name: str) -> Array:
    """Apply activation ``name``; 'rprelu' creates an RPReLU submodule ``module_name``."""
    if name == "rprelu":
        return L.RPReLU(name=module_name)(x)
    fn = activation_fn(name)
    return x if fn is None else fn(x)


def check_image_input(x: Array, model: str, min_size: int) -> None:
    """CNNs take NHWC batches whose spatial size survives their downsampling."""
    if x.ndim != 4:
        raise ConfigError(
            f"{model} expects NHWC input of rank 4 (batch, height, width, channels); "
            f"got shape {tuple(x.shape)} (rank {x.ndim})."
        )
    h, w = x.shape[1], x.shape[2]
    if h < min_size or w < min_size:
        raise ConfigError(
            f"{model} needs inputs of at least {min_size}x{min_size} pixels to survive its "
            f"downsampling; got {h}x{w} (input shape {tuple(x.shape)})."
        )


class _LayerFactories:
    """A model's quantization settings and the layer factories that apply them.

    A plain frozen dataclass (not a Module), so submodules such as residual units can
    carry it as a field and build their layers in their own scope. Its fields are the
    :data:`SPEC_FIELDS` of :class:`BinaryModel`, with their declarations
    (:data:`LayerSpec` is made from them).
    """

    def conv(
        self,
        features: int,
        kernel_size,
        strides=1,
        padding="SAME",
        *,
        name: str,
        quantize_input: bool = True,
        quantize_kernel: bool = True,
        use_bias: bool = False,
    ) -> nn.Module:
        """A convolution in this model's binary style (float when nothing is quantized)."""
        if quantize_input and quantize_kernel and self.layer_type == "abc":
            return L.ABCConv(
                features,
                kernel_size,
                strides,
                padding,
                m=self.abc_m,
                n=self.abc_n,
                pad_values=self.pad_values,
                use_bias=use_bias,
                name=name,
            )
        kq = self.kernel_quantizer if quantize_kernel else None
        return L.BinaryConv(
            features,
            kernel_size,
            strides,
            padding,
            use_bias=use_bias,
            pad_values=self.pad_values,
            input_quantizer=self.input_quantizer if quantize_input else None,
            input_quantizer_kwargs=self.input_quantizer_kwargs,
            kernel_quantizer=kq,
            kernel_quantizer_kwargs=self.kernel_quantizer_kwargs,
            kernel_init=nn.initializers.glorot_uniform() if kq is not None else nn.initializers.lecun_normal(),
            name=name,
        )

    def dense(
        self,
        features: int,
        *,
        name: str,
        quantize_input: bool = True,
        quantize_kernel: bool = True,
        use_bias: bool = False,
    ) -> nn.Module:
        """A dense layer in this model's binary style (float when nothing is quantized)."""
        if quantize_input and quantize_kernel and self.layer_type == "abc":
            return L.ABCDense(
                features, m=self.abc_m, n=self.abc_n, use_bias=use_bias, name=name
            )
        kq = self.kernel_quantizer if quantize_kernel else None
        return L.BinaryDense(
            features,
            use_bias=use_bias,
            input_quantizer=self.input_quantizer if quantize_input else None,
            input_quantizer_kwargs=self.input_quantizer_kwargs,
            kernel_quantizer=kq,
            kernel_quantizer_kwargs=self.kernel_quantizer_kwargs,
            kernel_init=nn.initializers.glorot_uniform() if kq is not None else nn.initializers.lecun_normal(),
            name=name,
        )

    def batch_norm(self, train: bool, name: str) -> nn.Module:
        return nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon, name=name
        )


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a sequential model's forward (:class:`binax.models.sequential.SequentialModel`).

    ``kind``:

    * ``"layer"``: the dense or conv layer ``path``; ``width`` is the ``(config key,
      index)`` of its output width (None: ``features``, e.g. the classifier's classes),
      ``quantize_input``/``quantize_kernel`` whether its input and its kernel go through
      the model's quantizers (as the layer factories' arguments), ``use_bias``; a conv
      layer has its ``window``, ``strides`` and ``padding`` (a dense layer: ``window=()``);
    * ``"block"``: :func:`bn_sign_block` at ``path`` (BatchNorm then the model's
      activation, or a BinaryBatchNorm);
    * ``"max_pool"``: ``window``, ``strides``, ``padding``;
    * ``"flatten"``: ``(N, ...) -> (N, -1)``;
    * ``"activation"``: the activation ``activation`` (its module at ``path`` for
      ``'rprelu'``).

    A sequential model writes its forward once as these steps: its ``__call__`` runs
    them, and its ``chain()`` is what the packed exporter (``binax.export``) and model
    surgery (``binax.transforms``: BinaryDuo decoupling) read.
    """

    kind: str
    path: tuple[str, ...] = ()
    width: tuple[str, int] | None = None
    quantize_input: bool = False
    window: tuple[int, ...] = ()
    strides: Any = ()
    padding: Any = "VALID"
    activation: str = "none"
    features: int | None = None
    quantize_kernel: bool = True
    use_bias: bool = False

    @staticmethod
    def layer(
        name: str,
        width: tuple[str, int] | None = None,
        *,
        quantize_input: bool = True,
        quantize_kernel: bool = True,
        features: int | None = None,
        use_bias: bool = False,
    ) -> "Step":
        """A dense layer."""
        return Step(
            "layer", (name,), width=width, quantize_input=quantize_input, quantize_kernel=quantize_kernel,
            features=features, use_bias=use_bias,
        )

    @staticmethod
    def conv(
        name: str,
        width: tuple[str, int],
        window: tuple[int, int],
        strides: Any = 1,
        padding: Any = "SAME",
        *,
        quantize_input: bool = True,
        quantize_kernel: bool = True,
    ) -> "Step":
        """A convolution layer."""
        return Step(
            "layer", (name,), width=width, quantize_input=quantize_input, quantize_kernel=quantize_kernel,
            window=tuple(window), strides=strides, padding=padding,
        )

    @staticmethod
    def block(name: str) -> "Step":
        return Step("block", (name,))

    @staticmethod
    def max_pool(window: tuple[int, int], strides: tuple[int, int], padding: str = "VALID") -> "Step":
        return Step("max_pool", window=tuple(window), strides=tuple(strides), padding=padding)

    @staticmethod
    def flatten() -> "Step":
        return Step("flatten")

    @staticmethod
    def apply_activation(name: str, module_name: str) -> "Step":
        return Step("activation", (module_name,), activation=name)


class BinaryModel(nn.Module):
    """Base of every binax model: the quantization fields every config has.

    Each dataclass field is a config key, declared once here or in a family's subclass:
    its default is the key's default and its annotation what is allowed
    (:mod:`binax.models.fields`). Subclasses add their architecture fields and
    ``__call__(x, train=False, progress=1.0)``; they build layers through
    ``layer_spec(self)``.
    """

    num_classes: Count = 10
    width_multiplier: Positive = 1.0
    # Binarizers by registry name (binax.binarizers.names()) and their keyword arguments
    # (schedule keywords too: t_min/t_max for ede_sign/libra_pb, nu_0/nu_max for tanh_sign).
    input_quantizer: QuantizerSpec = "ste_sign"
    input_quantizer_kwargs: Keywords = FrozenDict()
    kernel_quantizer: QuantizerSpec = "ste_sign"
    kernel_quantizer_kwargs: Keywords = FrozenDict()
    # The first layer sees pixels (never quantized); True also keeps its weights float.
    first_layer_float: bool = True
    # True: the classifier's input and weights are float.
    last_layer_float: bool = True
    # 'binary': BinaryConv/BinaryDense; 'abc': ABC-Net layers with abc_m x abc_n bases
    # (ABC layers ignore input_quantizer/kernel_quantizer).
    layer_type: LayerType = "binary"
    abc_m: Count = 3
    abc_n: Count = 3
    # Value binarized convolutions pad with; None: +1 when the input is binarized.
    pad_values: Real | None = None
    # Latent-weight clip the trainer applies after each update (None: no clipping).
    latent_weight_clip: Positive | None = None
    # Nonlinearity after each batch norm of a binary block ('none' lets the next
    # layer's input binarizer act directly on the BN output, as BNN does).
    activation: Activation = "none"
    bn_momentum: Fraction = 0.9
    bn_epsilon: Positive = 1e-5

    def chain(self) -> list[Step] | None:
        """The forward as a sequence of :class:`Step` (layer → [pool] → BN block → ...), or
        None when the model is not one chain (residual networks)."""
        return None


#: The fields of :class:`BinaryModel` that the layer factories read.
SPEC_FIELDS = (
    "input_quantizer",
    "input_quantizer_kwargs",
    "kernel_quantizer",
    "kernel_quantizer_kwargs",
    "layer_type",
    "abc_m",
    "abc_n",
    "pad_values",
    "activation",
    "bn_momentum",
    "bn_epsilon",
)

LayerSpec = dataclasses.make_dataclass(
    "LayerSpec",
    [
        (f.name, f.type, dataclasses.field(default=f.default))
        for f in dataclasses.fields(BinaryModel)
        if f.name in SPEC_FIELDS
    ],
    bases=(_LayerFactories,),
    frozen=True,
)
LayerSpec.__module__, LayerSpec.__doc__ = __name__, _LayerFactories.__doc__


def layer_spec(model: BinaryModel) -> LayerSpec:
    """The LayerSpec of a model's fields."""
    return LayerSpec(**{f: getattr(model, f) for f in SPEC_FIELDS})


def classifier(model: BinaryModel, x: Array, progress) -> Array:
    """The last dense layer (float unless ``last_layer_float=False``), with a bias."""
    q = not model.last_layer_float
    return layer_spec(model).dense(
        model.num_classes, name="classifier", quantize_input=q, quantize_kernel=q, use_bias=True
    )(x, progress)


def replicate_units(x: Array, copies: int) -> Array:
    """``copies`` side-by-side copies of the last (channel) axis: ``(..., C) -> (..., copies*C)``.

    BinaryDuo's decoupled network (Kim et al. ICLR 2020; official ``tinyVGG7_decoupled.lua``:
    ``nn.Replicate`` then ``nn.Reshape`` after each coupled layer) computes C channels and
    copies them before the batch norm, whose 2C channels then differ only in their own
    statistics and affine parameters. The two copies of a channel keep one set of weights
    while fine-tuning, so the network has the coupled network's binary-op count. Copy ``k``
    of channel ``c`` is channel ``k*C + c``, as Torch's replicate-then-reshape orders them.
    """
    return x if copies == 1 else jnp.concatenate([x] * copies, axis=-1)


def bn_sign_block(model: BinaryModel, x: Array, train: bool, name: str, binary_bn: bool) -> Array:
    """Batch norm then the model's activation; with ``binary_bn`` the pair BN -> sign is one
    :class:`binax.layers.BinaryBatchNorm` (inference only: fold a trained model's BN with
    ``binax.transforms.fold_binary_bn``)."""
    if binary_bn:
        if train:
            raise ConfigError(
                "binary_bn=True models are for inference (BinaryBatchNorm has no statistics "
                "or gradient); train the model with binary_bn=False and fold its batch norms."
            )
        return L.BinaryBatchNorm(name=name)(x)
    x = layer_spec(model).batch_norm(train, name)(x)
    return apply_activation(model.activation, x, name + "_act")
