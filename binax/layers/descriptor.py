"""The layer descriptor and registry: what a layer type IS, written once beside its class.

As every fact about a quantizer is read from its :class:`binax.quantizer.Quantizer`,
every fact about a layer type that the summary and the exporter need is read from its
:class:`LayerDescriptor`, registered with :func:`register` next to the class:

* **operands**: the input and kernel quantizers (registry specs and keywords), from which
  the summary reads bits and binary planes and the exporter the activation code and the
  packed kernel; or ABC-Net's ``(M, N)`` binary bases;
* **the product**: ``"dense"``, ``"conv"`` or ``"depthwise_conv"`` (MACs: one per weight
  and output position) with, for a convolution, its :class:`Geometry`; None for a layer
  without MACs (batch norms, shifts);
* **export**: ``"binary"`` (input bit planes × a ``±α`` kernel on XOR-popcount, or the
  quantized kernel in float), ``"abc"`` (M packed bases × N shifted sign planes), or None
  (its float variables are stored as they are); and its float form, the product of the
  (deployed) quantized input with a given float kernel, for layers that do not run packed;
* parameters stored at fixed bits (BinaryBatchNorm's ``sign``: 1 bit), and whether the
  layer's output is already binary (BinaryBatchNorm: no activation follows it).

A layer of your own registered with a descriptor is counted by ``binax.summary`` and
exported by ``binax.export`` like a built-in one (``tests/test_layer_descriptor.py``).
Flax's own ``nn.Dense`` and ``nn.Conv`` are registered here as float layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from jax import lax

from binax import binarizers
from binax.errors import ConfigError
from binax.packed import geometry

Array = jax.Array

__all__ = ["FLOAT_BITS", "PRODUCTS", "EXPORTS", "Operand", "Geometry", "LayerDescriptor", "register", "describe"]

FLOAT_BITS = 32
#: What a layer's MACs compute (:attr:`LayerDescriptor.product`).
PRODUCTS = ("dense", "conv", "depthwise_conv")
#: How a layer is exported packed (:attr:`LayerDescriptor.export`).
EXPORTS = ("binary", "abc")


@dataclasses.dataclass(frozen=True)
class Operand:
    """An operand of a MAC: storage bits per value, and binary planes (None: not binary)."""

    bits: int
    planes: int | None

    @property
    def binary(self) -> bool:
        return self.planes is not None


FLOAT = Operand(FLOAT_BITS, None)


def operand(spec, kwargs: Mapping[str, Any] | None = None) -> Operand:
    """A quantizer spec's bits and planes, read from its descriptor (None: float)."""
    q = binarizers.describe(spec)
    if q is None:
        return FLOAT
    kwargs = dict(kwargs or {})
    return Operand(q.bits_for(kwargs), q.planes_for(kwargs))


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A convolution's window, strides, padding, dilation, groups and pad value."""

    window: tuple[int, ...]
    strides: Any  # int or per-axis, as the layer's field
    padding: Any  # 'SAME' | 'VALID' | int | pairs, as the layer's field
    dilation: Any = 1
    groups: int = 1
    pad_value: float = 0.0

    def ntuple(self, field: str) -> tuple[int, ...]:
        return geometry.ntuple(getattr(self, field), len(self.window), field)

    def not_packable(self) -> str | None:
        """Why the packed 2-d convolution cannot run it (None if it can)."""
        if len(self.window) != 2:
            return f"{len(self.window)}-d convolution (packed_conv is 2-d)"
        if self.groups != 1:
            return f"grouped convolution (feature_group_count={self.groups})"
        if max(self.ntuple("dilation")) != 1:
            return f"dilated convolution (kernel_dilation={self.dilation})"
        return None


def _no_quantizer(module) -> tuple[Any, dict]:
    return None, {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDescriptor:
    """What a layer type is: the facts the summary and the exporter read.

    Attributes:
      product: ``"dense"``, ``"conv"`` or ``"depthwise_conv"``: what its MACs compute
        (its kernel is the parameter ``latent_kernel`` or ``kernel``); None: no MACs.
      input_quantizer, kernel_quantizer: ``module -> (spec, kwargs)`` of the quantizers a
        ``"binary"`` layer applies to its input and its kernel (``(None, {})``: float).
      bases: ``module -> (M, N)``: ABC-Net's weight and activation bases (the MACs are
        binary, ``M·N`` binary operations each); None for other layers.
      kernel_function: ``module -> (fn, kwargs)`` that the exporter evaluates on the
        latent kernel instead of the kernel quantizer (ABC-Net: the bases and their
        scales); None: the kernel quantizer.
      geometry: ``module -> Geometry`` of a convolution.
      export: ``"binary"``, ``"abc"`` or None (see the module docstring).
      float_forward: ``(module, x, kernel, arrays) -> y``, the layer with a float
        ``kernel`` (arrays: the exported ones, ``bias`` among them); None: the product of
        the deployed quantized input and the kernel, plus the bias.
      param_bits: parameters stored at a fixed bit width (``{"sign": 1}``).
      binary_output: the layer's output is already ±1 (no activation follows it).
      name: the summary's name for the product (``"Conv"``); default from ``product``.
    """

    product: str | None = None
    input_quantizer: Callable[[nn.Module], tuple[Any, dict]] = _no_quantizer
    kernel_quantizer: Callable[[nn.Module], tuple[Any, dict]] = _no_quantizer
    bases: Callable[[nn.Module], tuple[int, int]] | None = None
    kernel_function: Callable[[nn.Module], tuple[Callable, dict]] | None = None
    geometry: Callable[[nn.Module], Geometry] | None = None
    export: str | None = None
    float_forward: Callable[..., Array] | None = None
    param_bits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    binary_output: bool = False
    name: str | None = None

    def __post_init__(self):
        if self.product is not None and self.product not in PRODUCTS:
            raise ConfigError(f"layer descriptor: product={self.product!r} is not one of {PRODUCTS} or None.")
        if self.export is not None and self.export not in EXPORTS:
            raise ConfigError(f"layer descriptor: export={self.export!r} is not one of {EXPORTS} or None.")
        if self.export is not None and self.product is None:
            raise ConfigError("layer descriptor: a layer exported packed must declare its product.")
        if self.product in ("conv", "depthwise_conv") and self.geometry is None:
            raise ConfigError(f"layer descriptor: a {self.product} layer must declare its geometry.")

    # ---- what the summary reads

    @property
    def has_macs(self) -> bool:
        return self.product is not None

    def operands(self, module: nn.Module) -> tuple[Operand, Operand]:
        """``(input, kernel)`` operands of the MACs (ABC-Net: N and M binary bases)."""
        if self.bases is not None:
            m, n = self.bases(module)
            return Operand(n, n), Operand(m, m)
        return operand(*self.input_quantizer(module)), operand(*self.kernel_quantizer(module))

    def binary(self, module: nn.Module) -> bool:
        """Both operands are binary planes: the MACs run on XNOR-popcount."""
        i, k = self.operands(module)
        return i.binary and k.binary

    def mac_bits(self, module: nn.Module) -> int:
        """The precision of the MACs, ``max(input bits, kernel bits)`` (ABC-Net's are binary)."""
        if self.bases is not None:
            return 1
        i, k = self.operands(module)
        return max(i.bits, k.bits)

    def kind(self, module: nn.Module) -> str:
        """The name the layer goes by in the summary and the export report."""
        if self.product is None:
            return type(module).__name__
        if self.bases is not None:
            m, n = self.bases(module)
            return f"{type(module).__name__} ({m}×{n} binary bases)"
        base = self.name or {"dense": "Dense", "conv": "Conv", "depthwise_conv": "DepthwiseConv"}[self.product]
        return f"Binary{base}" if self.binary(module) else f"{base} (float)"

    def bits_of(self, module: nn.Module, name: str) -> int | None:
        """Bits per value of the parameter ``name`` when not its dtype's width, else None."""
        if name == "latent_kernel" and self.product is not None:
            bits = self.operands(module)[1].bits
            return bits if bits < FLOAT_BITS else None
        return self.param_bits.get(name)

    # ---- what the exporter reads

    def deployed_input(self, module: nn.Module) -> tuple[Any, dict]:
        """The input quantizer as it runs at inference (:func:`binax.binarizers.deployed`)."""
        return binarizers.deployed(*self.input_quantizer(module))

    def kernel_request(self, module: nn.Module, params: Mapping[str, Any]) -> tuple | None:
        """``(spec, kwargs, latent)`` that the exporter evaluates, or None (no quantized kernel)."""
        if self.export is None:
            return None
        if self.kernel_function is not None:
            fn, kwargs = self.kernel_function(module)
            return fn, kwargs, params["latent_kernel"]
        spec, kwargs = self.kernel_quantizer(module)
        return None if spec is None else (spec, dict(kwargs or {}), params["latent_kernel"])

    def forward_with(self, module: nn.Module, x: Array, kernel: Array, arrays: Mapping[str, Array]) -> Array:
        """The layer on input ``x`` with the float ``kernel`` (the export's float form)."""
        if self.float_forward is not None:
            return self.float_forward(module, x, kernel, arrays)
        spec, kwargs = self.deployed_input(module)
        fn = binarizers.resolve(spec, **kwargs)
        x = x if fn is None else fn(x, 1.0)
        kernel = kernel.astype(x.dtype)
        if self.product == "dense":
            y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        else:
            g = self.geometry(module)
            groups = x.shape[-1] if self.product == "depthwise_conv" else g.groups
            y = geometry.padded_conv(x, kernel, g.ntuple("strides"), g.padding, g.ntuple("dilation"), groups, g.pad_value)
        bias = arrays.get("bias")
        return y if bias is None else y + bias.astype(y.dtype)


_REGISTRY: dict[type, LayerDescriptor] = {}


def register(cls: type, descriptor: LayerDescriptor, *, overwrite: bool = False) -> LayerDescriptor:
    """Register ``descriptor`` for the layer class ``cls`` (and its subclasses)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"a layer descriptor is registered for a flax.linen.Module class; got {cls!r}.")
    if not isinstance(descriptor, LayerDescriptor):
        raise ConfigError(f"{cls.__name__}: expected a LayerDescriptor; got {type(descriptor).__name__}.")
    old = _REGISTRY.get(cls)
    if old is not None and old is not descriptor and not overwrite:
        raise ConfigError(f"layer class {cls.__qualname__} already has a descriptor; pass overwrite=True to replace it.")
    _REGISTRY[cls] = descriptor
    return descriptor


_PLAIN = LayerDescriptor()


def describe(module: nn.Module | type) -> LayerDescriptor:
    """The descriptor of a layer (or layer class): its own class's, else the nearest base
    class's; a module type registered by none is a layer without MACs or packed form."""
    cls = module if isinstance(module, type) else type(module)
    for c in cls.__mro__:
        if c in _REGISTRY:
            return _REGISTRY[c]
    return _PLAIN


def _flax_geometry(module) -> Geometry:
    ks = module.kernel_size
    window = (ks,) if isinstance(ks, int) else tuple(ks)
    return Geometry(window, module.strides or 1, module.padding, module.kernel_dilation or 1, module.feature_group_count)


register(nn.Dense, LayerDescriptor(product="dense"))
register(nn.Conv, LayerDescriptor(product="conv", geometry=_flax_geometry))
