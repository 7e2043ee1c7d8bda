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

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from binax import layers, models
from binax.errors import ConfigError
from binax.summary_table import LayerSummary, ModelSummary, Totals

__all__ = ["summary", "layer_kind", "ModelSummary", "LayerSummary", "Totals"]


# ---------------------------------------------------------------------- layers


def _flatten(variables: Mapping) -> list[tuple[str, tuple[str, ...], str, Any]]:
    """(collection, module path, leaf name, leaf) for every variable."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        out.append((keys[0], tuple(keys[1:-1]), keys[-1], leaf))
    return out


def layer_kind(module: nn.Module) -> str:
    """The name a dense/conv layer goes by in the summary and the export report:
    ``'BinaryConv'`` when it runs on XNOR-popcount (input and kernel binary planes),
    ``'ABCConv (3×2 binary bases)'`` for ABC-Net (M weight × N activation bases), else
    ``'Conv (float)'`` (``Dense``, ``DepthwiseConv`` alike), whatever its weights' bits;
    any other module: its class name (``'BatchNorm'``). Read from the layer's descriptor
    (:meth:`binax.layers.LayerDescriptor.kind`)."""
    return layers.describe(module).kind(module)


def _leaf_bits(desc: layers.LayerDescriptor, module: nn.Module, name: str, leaf: Any) -> int:
    """Bits per value of one variable (see the module docstring)."""
    bits = desc.bits_of(module, name)
    return jnp.dtype(leaf.dtype).itemsize * 8 if bits is None else bits


def _layer_row(path: tuple[str, ...], calls: list[models.Call], leaves: list[tuple[str, str, Any]]) -> LayerSummary | None:
    module = calls[0].module
    desc = layers.describe(module)
    if not leaves and not desc.has_macs:
        return None  # a container (the model, a residual unit): its layers have rows
    params_by_bits: dict[int, int] = {}
    trainable = memory = 0
    for collection, name, leaf in leaves:
        bits = _leaf_bits(desc, module, name, leaf)
        n = math.prod(leaf.shape)
        params_by_bits[bits] = params_by_bits.get(bits, 0) + n
        memory += bits * n
        trainable += n if collection == "params" else 0
    macs = binary_macs = binary_ops = 0
    in_op = k_op = mac_bits = None
    if desc.has_macs:
        in_op, k_op = desc.operands(module)
        kernel = next(leaf for _, name, leaf in leaves if name in ("latent_kernel", "kernel"))
        mac_bits = desc.mac_bits(module)
        for c in calls:
            macs += math.prod(c.out_shape[1:-1]) * math.prod(kernel.shape)
        if in_op.binary and k_op.binary:
            binary_macs = macs
            binary_ops = in_op.planes * k_op.planes * macs
    return LayerSummary(
        name="/".join(path) or type(module).__name__,
        kind=desc.kind(module),
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
        bases=desc.bases(module) if desc.bases is not None else None,
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
