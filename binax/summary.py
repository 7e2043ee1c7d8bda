"""Bit-aware model summary, like Larq's ``larq.models.summary`` (and a little more).

``binax.summary(model, input_shape)`` returns a :class:`ModelSummary`: one row per layer
(module) and per pooling or shortcut operation, in execution order, and totals;
``print(summary)`` prints the table, ``.to_dict()`` and ``.to_markdown()`` give it as data
and as a Markdown table. Nothing is allocated or compiled: the module calls come from
:func:`binax.models.trace` (``jax.eval_shape`` of ``model.init``), the pooling and
shortcut rows from the jaxpr of ``model.apply`` (``jax.make_jaxpr``, shapes only).

Columns: the layer (module path), its type, the input and kernel precision (bits) of
dense/conv layers, the output shape, parameters by bit-width, memory, MACs by precision
and binary operations.

Accounting rules:

* **Parameter bits.** A quantized kernel (``latent_kernel``) counts at its quantizer's
  bits (``binax.binarizers.describe(spec).bits``): 1 for a binarizer, 2 for a ternary
  or 2-bit quantizer, M for ABC-Net's M weight bases (M binary values per weight, shown
  as ``M×1``: M binary bases, not an M-bit, 2^M-level quantizer). A ``BinaryBatchNorm``'s ``sign``
  is 1 bit. Every other variable (float kernels, biases, BatchNorm scale/bias AND
  statistics, shifts, slopes, thresholds) counts at its dtype's width (32 for float32).
  Memory is the sum of bits; ``params_by_bits`` always adds up to ``params``;
  ``binary_params`` are the 1-bit ones, ``float_params`` those of 16 bits or more, and
  the rest (k-bit) is ``params − binary_params − float_params``.
* **Trainable.** Variables of the ``params`` collection are trainable; the others
  (``batch_stats``: BatchNorm's running mean and variance) are not.
* **Type.** A dense/conv layer is ``BinaryDense``/``BinaryConv``/... only when it runs
  on XNOR-popcount (both its input and its kernel are binary planes), ``ABCConv``/
  ``ABCDense (M×N binary bases)`` for ABC-Net; anything else is ``Dense (float)``/
  ``Conv (float)``/..., whatever its weights' bits (the precision columns give them).
  :func:`layer_kind` gives these names; the export report (``binax.export``) uses them too.
* **MACs.** A dense or conv layer does ``prod(output spatial) × kernel.size`` MACs per
  example (one per weight and output position, ABC-Net's included), at the precision
  ``max(input bits, kernel bits)`` (Larq's rule: float is 32). ``binary_macs`` are the
  MACs whose operands are both binary planes (they run on XNOR-popcount);
  ``float_macs`` are all the others, including few-bit but non-binary operands such as
  DoReFa k > 1 activations or ternary weights.
* **Binary operations.** A binary MAC with ``P`` input planes and ``Q`` weight planes is
  ``P·Q`` one-bit products: 1 for BNN/XNOR, 2 for BinaryDuo's ternary activations (two
  binary planes) and ``M·N`` for ABC-Net (M weight bases × N activation bases, whose MACs
  are therefore binary MACs, in the 1-bit column).
  ``binary_ops`` counts them, next to the MACs instead of inflating them.
* **Pooling and shortcut rows** (no parameters, no MACs): max/average pooling
  (``nn.max_pool``, ``nn.avg_pool``, ``binax.ops.max_pool``), global pooling (a mean or
  max over the spatial axes) and residual additions (an ``add`` of two activations of
  one shape), found outside the dense/conv/norm layers in the jaxpr of ``model.apply``
  and named after the module they run in (``stage1_block0_unit0/shortcut_add``).

The paper checks (``tests/test_summary.py``): Bi-Real Net ResNet-18 has 1.68e9 binary
operations and 1.63e8 FLOPs (float MACs + binary/64).
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
from binax.errors import ConfigError

__all__ = ["summary", "layer_kind", "ModelSummary", "LayerSummary", "Totals"]

FLOAT_BITS = 32


class _Counts:
    """Parameter and MAC splits shared by a row and the totals (from ``params``,
    ``params_by_bits``, ``trainable_params``, ``macs`` and ``binary_macs``)."""

    @property
    def non_trainable_params(self) -> int:
        return self.params - self.trainable_params

    @property
    def binary_params(self) -> int:
        return self.params_by_bits.get(1, 0)

    @property
    def float_params(self) -> int:
        return sum(n for b, n in self.params_by_bits.items() if b >= 16)

    @property
    def float_macs(self) -> int:
        return self.macs - self.binary_macs


@dataclasses.dataclass(frozen=True)
class LayerSummary(_Counts):
    """One row of a summary: a layer (module) or a pooling / shortcut operation."""

    name: str  # module path, '/'-joined (an operation: its module's path + '/max_pool' ...)
    kind: str  # 'BinaryConv', 'Conv (float)', 'BatchNorm', 'MaxPool', 'Add (shortcut)' ...
    output_shape: tuple[int, ...]  # per example (batch axis dropped)
    params_by_bits: dict[int, int] = dataclasses.field(default_factory=dict)  # bit-width -> count
    trainable_params: int = 0
    memory_bits: int = 0
    macs: int = 0
    mac_bits: int | None = None  # precision of the MACs: max(input bits, kernel bits)
    binary_macs: int = 0
    binary_ops: int = 0
    input_bits: int | None = None  # of the (quantized) input, for dense/conv layers
    kernel_bits: int | None = None
    bases: tuple[int, int] | None = None  # ABC-Net: (M weight bases, N activation bases)

    @property
    def params(self) -> int:
        return sum(self.params_by_bits.values())

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "output_shape": list(self.output_shape),
            "input_bits": self.input_bits,
            "kernel_bits": self.kernel_bits,
            "params": self.params,
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "memory_bits": self.memory_bits,
            "macs": self.macs,
            "mac_bits": self.mac_bits,
            "binary_macs": self.binary_macs,
            "float_macs": self.float_macs,
            "binary_ops": self.binary_ops,
            "bases": list(self.bases) if self.bases else None,
        }


@dataclasses.dataclass(frozen=True)
class Totals(_Counts):
    """Whole-model totals (sums of the rows). Sizes are in bytes."""

    params: int
    params_by_bits: dict[int, int]
    trainable_params: int
    memory_bytes: float  # packed: each parameter at its bit-width
    float32_bytes: int  # every parameter as float32
    macs_by_bits: dict[int, int]
    binary_macs: int
    binary_ops: int

    @property
    def compression_ratio(self) -> float:
        """float32 size / packed size."""
        return self.float32_bytes / self.memory_bytes if self.memory_bytes else float("nan")

    @property
    def macs(self) -> int:
        return sum(self.macs_by_bits.values())

    @property
    def binary_mac_fraction(self) -> float:
        """Share of binary MACs (on XNOR-popcount) among all MACs."""
        return self.binary_macs / self.macs if self.macs else 0.0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
            "binary_params": self.binary_params,
            "float_params": self.float_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
            "memory_bytes": self.memory_bytes,
            "float32_bytes": self.float32_bytes,
            "compression_ratio": self.compression_ratio,
            "macs": self.macs,
            "macs_by_bits": {str(b): n for b, n in sorted(self.macs_by_bits.items())},
            "binary_macs": self.binary_macs,
            "float_macs": self.float_macs,
            "binary_mac_fraction": self.binary_mac_fraction,
            "binary_ops": self.binary_ops,
        }


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
    binary_ops = property(lambda self: self.totals.binary_ops)

    def layer(self, name: str) -> LayerSummary:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"no layer {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def print(self) -> None:
        print(str(self))

    def to_dict(self) -> dict:
        """Rows and totals as plain Python data (JSON-ready)."""
        return {
            "model": self.model,
            "input_shape": list(self.input_shape),
            "layers": [r.to_dict() for r in self.layers],
            "totals": self.totals.to_dict(),
        }

    # ---- tables

    def _table(self) -> tuple[list[str], list[list[str]], list[str], set[int]]:
        """(header, rows, total row, numeric columns) as strings."""
        param_bits = sorted({b for row in self.layers for b in row.params_by_bits})
        mac_bits = sorted(self.totals.macs_by_bits)
        header = ["Layer", "Type", "In bits", "W bits", "Output shape"]
        header += [f"{self._bits_label(b)} params" for b in param_bits] + ["Memory (KiB)"]
        header += [f"{b}-bit MACs" for b in mac_bits] + ["Binary ops"]
        rows = []
        for r in self.layers:
            in_bits, w_bits = (f"{r.bases[1]}×1", f"{r.bases[0]}×1") if r.bases else (_bits(r.input_bits), _bits(r.kernel_bits))
            rows.append(
                [r.name, r.kind, in_bits, w_bits, str(r.output_shape)]
                + [_count(r.params_by_bits.get(b, 0)) for b in param_bits]
                + [f"{r.memory_bits / 8 / 1024:.2f}"]
                + [_count(r.macs if r.mac_bits == b else 0) for b in mac_bits]
                + [_count(r.binary_ops)]
            )
        t = self.totals
        total = (
            ["Total", "", "", "", ""]
            + [_count(t.params_by_bits.get(b, 0)) for b in param_bits]
            + [f"{t.memory_bytes / 1024:.2f}"]
            + [_count(t.macs_by_bits.get(b, 0)) for b in mac_bits]
            + [_count(t.binary_ops)]
        )
        return header, rows, total, set(range(2, len(header)))

    def _bits_label(self, bits: int) -> str:
        """``'3-bit'``, or ``'3×1-bit'`` where only ABC-Net's weight bases have ``bits``
        (M binary values per weight, not an M-bit quantizer)."""
        owners = [r for r in self.layers if r.params_by_bits.get(bits)]
        abc_only = bits > 1 and owners and all(r.bases and r.bases[0] == bits for r in owners)
        return f"{bits}×1-bit" if abc_only else f"{bits}-bit"

    def _lines(self) -> list[str]:
        t = self.totals
        by_bits = ", ".join(f"{n:,} {self._bits_label(b)}" for b, n in sorted(t.params_by_bits.items()))
        lines = [
            f"Total params: {t.params:,} ({by_bits})",
            f"Trainable params: {t.trainable_params:,}; non-trainable (batch statistics): {t.non_trainable_params:,}",
            f"Model size: {_size(t.memory_bytes)} packed vs {_size(t.float32_bytes)} float32 "
            f"(compression x{t.compression_ratio:.2f})",
            f"MACs: {t.macs:,} ({t.binary_macs:,} binary on XNOR-popcount, {t.float_macs:,} float; "
            f"{100 * t.binary_mac_fraction:.2f}% binary)",
            f"Binary ops: {t.binary_ops:,} (a binary MAC of P input and Q weight planes is P*Q)",
        ]
        return lines

    def __str__(self) -> str:
        header, rows, total, numeric = self._table()
        table = [header] + rows + [total]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        lines = [f"{self.model} summary, input {self.input_shape}", rule, fmt(header), rule]
        lines += [fmt(r) for r in rows] + [rule, fmt(total), rule]
        return "\n".join(lines + self._lines())

    def to_markdown(self) -> str:
        """The table as GitHub Markdown, then the totals as a list."""
        header, rows, total, numeric = self._table()
        total = ["**Total**"] + total[1:]

        def fmt(row):
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

        align = ["---:" if i in numeric else "---" for i in range(len(header))]
        lines = [f"**{self.model}**, input {self.input_shape}", "", fmt(header), "|" + "|".join(align) + "|"]
        lines += [fmt(r) for r in rows] + [fmt(total), ""]
        return "\n".join(lines + [f"- {line}" for line in self._lines()])


def _count(n: int) -> str:
    return f"{n:,}" if n else "0"


def _bits(b: int | None) -> str:
    return "-" if b is None else str(b)


def _size(nbytes: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


# ---------------------------------------------------------------------- layers


def _flatten(variables: Mapping) -> list[tuple[str, tuple[str, ...], str, Any]]:
    """(collection, module path, leaf name, leaf) for every variable."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        out.append((keys[0], tuple(keys[1:-1]), keys[-1], leaf))
    return out


_MAC_LAYERS = (L.BinaryDense, L.BinaryConv, L.BinaryDepthwiseConv, L.ABCDense, L.ABCConv, nn.Dense, nn.Conv)


@dataclasses.dataclass(frozen=True)
class _Operand:
    """An operand of a MAC: storage bits per value, and binary planes (None: not binary)."""

    bits: int
    planes: int | None


_FLOAT = _Operand(FLOAT_BITS, None)


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


def layer_kind(module: nn.Module) -> str:
    """The name a dense/conv layer goes by in the summary and the export report:
    ``'BinaryConv'`` when it runs on XNOR-popcount (input and kernel binary planes),
    ``'ABCConv (3×2 binary bases)'`` for ABC-Net (M weight × N activation bases), else
    ``'Conv (float)'`` (``Dense``, ``DepthwiseConv`` alike), whatever its weights' bits;
    any other module: its class name (``'BatchNorm'``)."""
    if not isinstance(module, _MAC_LAYERS):
        return type(module).__name__
    in_op, k_op = _operand_info(module)
    return _kind(module, in_op.planes is not None and k_op.planes is not None)


def _kind(module: nn.Module, binary: bool) -> str:
    """'BinaryConv' when the layer runs on XNOR-popcount, else 'Conv (float)' ..."""
    if isinstance(module, (L.ABCDense, L.ABCConv)):
        return f"{type(module).__name__} ({module.m}×{module.n} binary bases)"
    if isinstance(module, L.BinaryDepthwiseConv):
        base = "DepthwiseConv"
    elif isinstance(module, (L.BinaryConv, nn.Conv)):
        base = "Conv"
    else:
        base = "Dense"
    return f"Binary{base}" if binary else f"{base} (float)"


def _leaf_bits(module: nn.Module | None, name: str, leaf: Any, kernel: _Operand | None) -> int:
    """Bits per value of one variable (see the module docstring)."""
    if name == "latent_kernel" and kernel is not None and kernel.bits < FLOAT_BITS:
        return kernel.bits
    if name == "sign" and isinstance(module, L.BinaryBatchNorm):
        return 1
    return jnp.dtype(leaf.dtype).itemsize * 8


def _layer_row(path: tuple[str, ...], calls: list[models.Call], leaves: list[tuple[str, str, Any]]) -> LayerSummary | None:
    module = calls[0].module
    is_mac_layer = isinstance(module, _MAC_LAYERS)
    if not leaves and not is_mac_layer:
        return None  # a container (the model, a residual unit): its layers have rows
    in_op, k_op = _operand_info(module) if is_mac_layer else (None, None)
    params_by_bits: dict[int, int] = {}
    trainable = memory = 0
    for collection, name, leaf in leaves:
        bits = _leaf_bits(module, name, leaf, k_op)
        n = math.prod(leaf.shape)
        params_by_bits[bits] = params_by_bits.get(bits, 0) + n
        memory += bits * n
        trainable += n if collection == "params" else 0
    macs = binary_macs = binary_ops = 0
    binary = False
    mac_bits = None
    if is_mac_layer:
        kernel = next(leaf for _, name, leaf in leaves if name in ("latent_kernel", "kernel"))
        binary = in_op.planes is not None and k_op.planes is not None
        # ABC-Net's MACs are binary (M·N binary planes: its binary ops say how many).
        is_abc = isinstance(module, (L.ABCDense, L.ABCConv))
        mac_bits = 1 if is_abc else max(in_op.bits, k_op.bits)
        for c in calls:
            macs += math.prod(c.out_shape[1:-1]) * math.prod(kernel.shape)
        if binary:
            binary_macs = macs
            binary_ops = in_op.planes * k_op.planes * macs
    return LayerSummary(
        name="/".join(path) or type(module).__name__,
        kind=_kind(module, binary) if is_mac_layer else type(module).__name__,
        output_shape=calls[0].out_shape[1:],
        params_by_bits=params_by_bits,
        trainable_params=trainable,
        memory_bits=memory,
        macs=macs,
        mac_bits=mac_bits,
        binary_macs=binary_macs,
        binary_ops=binary_ops,
        input_bits=in_op.bits if in_op else None,
        kernel_bits=k_op.bits if k_op else None,
        bases=(module.m, module.n) if isinstance(module, (L.ABCDense, L.ABCConv)) else None,
    )


# ---------------------------------------------------------------------- operations


def _scope(eqn) -> tuple[str, ...]:
    """The module path of a jaxpr equation, from Flax's named scopes (``VGG/conv1`` ->
    ``('conv1',)``; method scopes such as ``unit._downsample`` are dropped)."""
    parts = [p for p in str(eqn.source_info.name_stack).split("/") if p]
    return tuple(p for p in parts[1:] if "." not in p)


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is not None:
            return getattr(j, "jaxpr", j)
    return None


def _vars(eqn) -> list:
    """The equation's input variables (literals, which cannot be hashed, left out)."""
    return [v for v in eqn.invars if not hasattr(v, "val")]


def _primitives(jaxpr) -> set[str]:
    out = set()
    for e in jaxpr.eqns:
        out.add(e.primitive.name)
        sub = _sub_jaxpr(e)
        if sub is not None:
            out |= _primitives(sub)
    return out


def _operation(eqn, tainted) -> tuple[str, str] | None:
    """(row type, name suffix) of a pooling or shortcut equation, or None."""
    name = eqn.primitive.name
    ins = [v for v in _vars(eqn) if v in tainted]
    if not ins:
        return None
    x, out = ins[0].aval, eqn.outvars[0].aval
    spatial_4d = len(x.shape) == 4 and len(out.shape) == 4 and out.shape[1:3] != x.shape[1:3]
    if name == "reduce_window_max" and spatial_4d:
        return "MaxPool", "max_pool"
    if name == "reduce_window_sum" and spatial_4d:
        return "AvgPool", "avg_pool"
    if name in ("custom_vjp_call", "custom_jvp_call") and spatial_4d and out.shape[3] == x.shape[3]:
        sub = _sub_jaxpr(eqn)
        if sub is not None and _primitives(sub) & {"reduce_max", "reduce_window_max"}:
            return "MaxPool", "max_pool"
    if name in ("reduce_sum", "reduce_max") and len(x.shape) == 4 and {1, 2} <= set(eqn.params.get("axes", ())):
        return ("GlobalAvgPool", "global_avg_pool") if name == "reduce_sum" else ("GlobalMaxPool", "global_max_pool")
    if name == "add" and len(ins) == 2 and ins[0].aval.shape == ins[1].aval.shape == out.shape and len(out.shape) >= 2:
        return "Add (shortcut)", "shortcut_add"
    return None


def _walk(jaxpr, tainted: set, layer_paths: set, ops: list, first: dict, pos: tuple = (), scope_of=None) -> None:
    """Finds the pooling/shortcut equations outside the layers: appends ``(position, path,
    type, suffix, output shape)`` to ``ops``, and records in ``first`` the position of each
    module path's first equation. ``tainted`` holds the variables computed from the input
    images (so a bias or a BatchNorm statistic is never an operand)."""
    for i, eqn in enumerate(jaxpr.eqns):
        at = pos + (i,)
        scope = scope_of if scope_of is not None else _scope(eqn)
        first.setdefault(scope, at)
        if not any(v in tainted for v in _vars(eqn)):
            continue
        tainted.update(eqn.outvars)
        if any(scope[: len(p)] == p for p in layer_paths):
            continue  # inside a dense/conv/norm layer
        sub = _sub_jaxpr(eqn)
        if eqn.primitive.name in ("pjit", "closed_call", "core_call") and sub is not None:
            inner = {iv for iv, ov in zip(sub.invars, eqn.invars) if ov in tainted}
            _walk(sub, inner, layer_paths, ops, first, at, scope)
            continue
        op = _operation(eqn, tainted)
        if op is not None:
            ops.append((at, scope, op[0], op[1], tuple(eqn.outvars[0].aval.shape[1:])))


def _ordered_rows(model, variables, input_shape, progress, layer_rows) -> list[LayerSummary]:
    """The layer rows and the pooling/shortcut rows, in execution order (positions in the
    jaxpr of ``model.apply``)."""
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False, progress=progress))(variables, x)
    ops: list = []
    first: dict = {}
    _walk(closed.jaxpr, {closed.jaxpr.invars[-1]}, {p for p, _ in layer_rows if p}, ops, first)
    placed = []
    last = ()
    for k, (path, row) in enumerate(layer_rows):
        at = min((q for s, q in first.items() if s[: len(path)] == path), default=None) if path else ()
        last = last if at is None else at
        placed.append((last, 0, k, row))  # a layer without equations stays after the one before
    used: dict[str, int] = {}
    for k, (at, scope, kind, suffix, shape) in enumerate(ops):
        base = "/".join(scope + (suffix,))
        used[base] = used.get(base, 0) + 1
        name = base if used[base] == 1 else f"{base}_{used[base] - 1}"
        placed.append((at, 1, k, LayerSummary(name=name, kind=kind, output_shape=shape)))
    return [row for *_, row in sorted(placed, key=lambda t: t[:3])]


# ---------------------------------------------------------------------- summary


def summary(model: nn.Module, input_shape: Sequence[int], *, progress: float = 1.0) -> ModelSummary:
    """Bit-aware summary of ``model`` for one example of shape ``input_shape``.

    ``input_shape`` excludes the batch axis, e.g. ``(32, 32, 3)``. See the module
    docstring for what counts as binary. Nothing is allocated: shapes come from
    ``jax.eval_shape`` and ``jax.make_jaxpr``.
    """
    if isinstance(input_shape, int) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ConfigError(
            f"input_shape must be a sequence of positive ints (one example, no batch axis); got {input_shape!r}."
        )
    input_shape = tuple(input_shape)
    calls, variables = models.trace(model, input_shape, progress=progress)

    # Each variable belongs to the deepest called module whose path prefixes it.
    by_path: dict[tuple[str, ...], list[models.Call]] = {}
    for c in calls:
        by_path.setdefault(c.path, []).append(c)
    owned: dict[tuple[str, ...], list[tuple[str, str, Any]]] = {}
    for collection, path, name, leaf in _flatten(variables):
        owner = max((p for p in by_path if p == path[: len(p)]), key=len, default=())
        owned.setdefault(owner, []).append((collection, name, leaf))

    layer_rows = []
    for path in sorted(by_path, key=lambda p: calls.index(by_path[p][0])):
        row = _layer_row(path, by_path[path], owned.get(path, []))
        if row is not None:
            layer_rows.append((path, row))
    rows = _ordered_rows(model, variables, input_shape, progress, layer_rows)

    by_bits: dict[int, int] = {}
    macs_by_bits: dict[int, int] = {}
    for r in rows:
        for b, n in r.params_by_bits.items():
            by_bits[b] = by_bits.get(b, 0) + n
        if r.macs:
            macs_by_bits[r.mac_bits] = macs_by_bits.get(r.mac_bits, 0) + r.macs
    total = sum(by_bits.values())
    totals = Totals(
        params=total,
        params_by_bits=dict(sorted(by_bits.items())),
        trainable_params=sum(r.trainable_params for r in rows),
        memory_bytes=sum(r.memory_bits for r in rows) / 8,
        float32_bytes=4 * total,
        macs_by_bits=dict(sorted(macs_by_bits.items())),
        binary_macs=sum(r.binary_macs for r in rows),
        binary_ops=sum(r.binary_ops for r in rows),
    )
    return ModelSummary(type(model).__name__, input_shape, rows, totals)
