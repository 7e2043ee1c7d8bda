"""Bit-aware model summary, like Larq's ``larq.models.summary``.

``binax.summary(model, input_shape)`` traces ``model.init`` with the model tracer
(:func:`binax.models.trace`: ``jax.eval_shape``, so no array is allocated, under
``flax.linen.intercept_methods``), which records every module call with its input and
output shapes. It returns a :class:`ModelSummary`: per layer the
output shape, parameters by bit-width, memory, and MACs split into binary and float; and
totals. ``print(summary)`` prints the table.

Accounting rules:

* A quantized kernel (``latent_kernel``) is stored at its quantizer's bits (its
  ``binax.binarizers.describe(spec).bits``): 1 for a binarizer, M for ABC-Net's M weight
  bases. Every other variable (float kernels, biases,
  batch-norm scale/bias AND statistics, shifts, slopes, thresholds) is a float parameter
  at its dtype's width (32 bits for float32); a ``BinaryBatchNorm``'s ``sign`` is 1 bit.
* MACs of a dense or conv layer: ``prod(output spatial) * kernel.size`` per example. A
  MAC is binary only when both the (quantized) input and the kernel are binary; ABC-Net's
  M weight x N activation bases make ``M * N`` binary MACs per MAC, BinaryDuo's ternary
  activation (two binary activations after decoupling) 2. Everything else is a float MAC
  (including few-bit but non-binary operands such as DoReFa k > 1 or ternary weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from binax import binarizers, models
from binax import layers as L

__all__ = ["summary", "ModelSummary", "LayerSummary", "Totals"]


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One layer (leaf module) of a summary."""

    name: str  # module path, '/'-joined
    kind: str  # module class name
    output_shape: tuple[int, ...]  # per example (batch axis dropped)
    params_by_bits: dict[int, int]  # bit-width -> number of parameters
    binary_params: int
    float_params: int
    memory_bits: int
    binary_macs: int
    float_macs: int
    input_bits: int | None = None  # of the quantized input, for dense/conv layers
    kernel_bits: int | None = None

    @property
    def params(self) -> int:
        return sum(self.params_by_bits.values())


@dataclasses.dataclass(frozen=True)
class Totals:
    """Whole-model totals. Sizes are in bytes."""

    params: int
    binary_params: int
    float_params: int
    params_by_bits: dict[int, int]
    memory_bytes: float  # packed: each parameter at its bit-width
    float32_bytes: int  # every parameter as float32
    binary_macs: int
    float_macs: int

    @property
    def compression_ratio(self) -> float:
        """float32 size / packed size."""
        return self.float32_bytes / self.memory_bytes if self.memory_bytes else float("nan")

    @property
    def macs(self) -> int:
        return self.binary_macs + self.float_macs

    @property
    def binary_mac_fraction(self) -> float:
        """Share of binary MACs among all MACs."""
        return self.binary_macs / self.macs if self.macs else 0.0


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Per-layer rows and totals; ``str()`` / ``print()`` give the table."""

    model: str
    input_shape: tuple[int, ...]
    layers: list[LayerSummary]
    totals: Totals

    # The totals most callers want, at the top level as well.
    binary_params = property(lambda self: self.totals.binary_params)
    float_params = property(lambda self: self.totals.float_params)
    binary_macs = property(lambda self: self.totals.binary_macs)
    float_macs = property(lambda self: self.totals.float_macs)

    def layer(self, name: str) -> LayerSummary:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def print(self) -> None:
        print(str(self))

    def __str__(self) -> str:
        bit_widths = sorted({b for row in self.layers for b in row.params_by_bits})
        header = ["Layer", "Type", "Output shape"] + [f"{b}-bit par." for b in bit_widths]
        header += ["Memory (KiB)", "Binary MACs", "Float MACs"]
        rows = [header]
        for r in self.layers:
            rows.append(
                [r.name, r.kind, str(r.output_shape)]
                + [_count(r.params_by_bits.get(b, 0)) for b in bit_widths]
                + [f"{r.memory_bits / 8 / 1024:.2f}", _count(r.binary_macs), _count(r.float_macs)]
            )
        t = self.totals
        rows.append(
            ["Total", "", ""]
            + [_count(t.params_by_bits.get(b, 0)) for b in bit_widths]
            + [f"{t.memory_bytes / 1024:.2f}", _count(t.binary_macs), _count(t.float_macs)]
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        numeric = set(range(3, len(header)))

        def fmt(row):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        lines = [f"{self.model} summary, input {self.input_shape}", rule, fmt(header), rule]
        lines += [fmt(r) for r in rows[1:-1]] + [rule, fmt(rows[-1]), rule]
        lines += [
            f"Total params: {t.params:,} ({t.binary_params:,} binary, {t.float_params:,} float)",
            f"Model size: {_size(t.memory_bytes)} packed vs {_size(t.float32_bytes)} float32 "
            f"(compression x{t.compression_ratio:.2f})",
            f"MACs: {t.macs:,} ({t.binary_macs:,} binary, {t.float_macs:,} float; "
            f"{100 * t.binary_mac_fraction:.2f}% binary)",
        ]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n:,}" if n else "0"


def _size(nbytes: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


# ---------------------------------------------------------------------- tracing


def _flatten(variables: Mapping) -> list[tuple[tuple[str, ...], str, Any]]:
    """(module path, leaf name, leaf) for every variable, over all collections."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        out.append((tuple(keys[1:-1]), keys[-1], leaf))
    return out


_MAC_LAYERS = (L.BinaryDense, L.BinaryConv, L.BinaryDepthwiseConv, L.ABCDense, L.ABCConv, nn.Dense, nn.Conv)


@dataclasses.dataclass(frozen=True)
class _Operand:
    """An operand of a MAC: storage bits per value, and binary planes (None: float)."""

    bits: int
    planes: int | None


_FLOAT = _Operand(32, None)


def _operand(spec, kwargs) -> _Operand:
    """A quantizer spec's bits and planes, from its descriptor (``binax.binarizers.describe``)."""
    q = binarizers.describe(spec)
    if q is None:
        return _FLOAT
    kwargs = dict(kwargs or {})
    return _Operand(q.bits_for(kwargs), q.planes_for(kwargs))


def _operand_info(module: nn.Module) -> tuple[_Operand, _Operand]:
    """(input, kernel) quantization of a dense/conv layer."""
    if isinstance(module, (L.ABCDense, L.ABCConv)):
        return _Operand(module.n, module.n), _Operand(module.m, module.m)
    if isinstance(module, (L.BinaryDense, L.BinaryConv, L.BinaryDepthwiseConv)):
        return (
            _operand(module.input_quantizer, module.input_quantizer_kwargs),
            _operand(module.kernel_quantizer, module.kernel_quantizer_kwargs),
        )
    return _FLOAT, _FLOAT


def _leaf_bits(module: nn.Module | None, name: str, leaf: Any, kernel: _Operand | None) -> tuple[int, bool]:
    """(bits per value, is it a binary parameter)."""
    if name == "latent_kernel" and kernel is not None and kernel.bits < 32:
        return kernel.bits, kernel.planes is not None
    if name == "sign" and isinstance(module, L.BinaryBatchNorm):
        return 1, True
    return jnp.dtype(leaf.dtype).itemsize * 8, False


def summary(model: nn.Module, input_shape: Sequence[int], *, progress: float = 1.0) -> ModelSummary:
    """Bit-aware summary of ``model`` for one example of shape ``input_shape``.

    ``input_shape`` excludes the batch axis, e.g. ``(32, 32, 3)``. See the module
    docstring for what counts as binary. Nothing is allocated: shapes come from
    ``jax.eval_shape``.
    """
    if isinstance(input_shape, int) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ValueError(
            f"input_shape must be a sequence of positive ints (one example, no batch axis); got {input_shape!r}."
        )
    input_shape = tuple(input_shape)
    calls, variables = models.trace(model, input_shape, progress=progress)

    # Each variable belongs to the deepest called module whose path prefixes it.
    by_path: dict[tuple[str, ...], list[models.Call]] = {}
    for c in calls:
        by_path.setdefault(c.path, []).append(c)
    owned: dict[tuple[str, ...], list[tuple[str, Any]]] = {}
    for path, name, leaf in _flatten(variables):
        owner = max((p for p in by_path if p == path[: len(p)]), key=len, default=())
        owned.setdefault(owner, []).append((name, leaf))

    rows = []
    for path in sorted(by_path, key=lambda p: calls.index(by_path[p][0])):
        first = by_path[path][0]
        module = first.module
        leaves = owned.get(path, [])
        is_mac_layer = isinstance(module, _MAC_LAYERS)
        if not leaves and not is_mac_layer:
            continue  # a container (the model, a residual unit): its layers have rows
        in_info, k_info = _operand_info(module) if is_mac_layer else (None, None)
        params_by_bits: dict[int, int] = {}
        binary_params = float_params = memory = 0
        for name, leaf in leaves:
            bits, is_binary = _leaf_bits(module, name, leaf, k_info)
            n = math.prod(leaf.shape)
            params_by_bits[bits] = params_by_bits.get(bits, 0) + n
            memory += bits * n
            if is_binary:
                binary_params += n
            elif bits >= 16:
                float_params += n
        binary_macs = float_macs = 0
        if is_mac_layer:
            kernel = dict(leaves).get("latent_kernel", dict(leaves).get("kernel"))
            for c in by_path[path]:
                base = math.prod(c.out_shape[1:-1]) * math.prod(kernel.shape)
                if in_info.planes is not None and k_info.planes is not None:
                    binary_macs += in_info.planes * k_info.planes * base
                else:
                    float_macs += base
        rows.append(
            LayerSummary(
                name="/".join(path) or type(module).__name__,
                kind=type(module).__name__,
                output_shape=first.out_shape[1:],
                params_by_bits=params_by_bits,
                binary_params=binary_params,
                float_params=float_params,
                memory_bits=memory,
                binary_macs=binary_macs,
                float_macs=float_macs,
                input_bits=in_info.bits if in_info else None,
                kernel_bits=k_info.bits if k_info else None,
            )
        )

    by_bits: dict[int, int] = {}
    for r in rows:
        for b, n in r.params_by_bits.items():
            by_bits[b] = by_bits.get(b, 0) + n
    total = sum(by_bits.values())
    totals = Totals(
        params=total,
        binary_params=sum(r.binary_params for r in rows),
        float_params=sum(r.float_params for r in rows),
        params_by_bits=dict(sorted(by_bits.items())),
        memory_bytes=sum(r.memory_bits for r in rows) / 8,
        float32_bytes=4 * total,
        binary_macs=sum(r.binary_macs for r in rows),
        float_macs=sum(r.float_macs for r in rows),
    )
    return ModelSummary(type(model).__name__, input_shape, rows, totals)
