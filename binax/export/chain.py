"""The packed chain: sequential models whose binary layers pass packed bits to each other.

For a chain ``binary layer → [max-pool] → BatchNorm → activation → quantizer → binary
layer`` (``bnn_mlp``, the VGG family, AlexNet), everything between two binary layers is a
function of ONE integer per output channel: the accumulator ``a`` of the first layer
(its float output is ``a·scale_c (+ bias_c)`` with ``scale_c >= 0``). Each input plane of
the next layer is therefore a boolean function of ``a``, per channel; when it is monotone
it is ``(a >= t_c) XOR flip_c`` (BinaryBN: ``sign(BN(x)) = sign(γ)·sign(x − τ)``), and the
next layer's packed bits come straight from the int32 accumulators
(:func:`binax.packed.threshold_to_bits`), with no float activation in between.

The thresholds (:mod:`binax.export.thresholds`) are not derived from the BatchNorm
formula but read off the float computation itself: the block (the model's own BatchNorm/BinaryBatchNorm, activation and
quantizer modules, jitted as in the model) is evaluated on EVERY reachable accumulator
value ``a ∈ [−A, A]`` for every channel, and ``t``/``flip`` are where the output plane
changes. So the packed chain reproduces the float graph bit for bit wherever the float
graph's layer output equals ``fl(a·scale)`` (sign-like weights, and any power-of-two
scale such as Libra-PB's; for XNOR's ``mean|W|`` the float graph's own convolution
rounding can differ by an ulp). Non-monotone blocks (e.g. an RPReLU with a negative
slope) are not fused: the chain decodes to float there.

Max-pooling commutes with both steps: ``max`` of ``fl(a·scale)`` is ``fl(max(a)·scale)``
(``scale >= 0``), and a monotone plane of the max is the OR (flip: the AND) of the planes,
so pools run on the packed words (32 channels per ``uint32``) with a bitwise OR.

A model takes part by describing its forward as a chain, next to its ``__call__``
(``model.chain()``: :class:`binax.models.common.Step` ``flatten``, ``layer``,
``max_pool``, ``block`` for ``bn_sign_block``, ``activation``). The tests compare every
chained model with its training graph in eval mode.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from binax import layers
from binax.export.packed_layer import PackedLayer
from binax.export.thresholds import compile_thresholds
from binax.models import common
from binax.models.common import Step
from binax.packed.bits import pack_bits
from binax.packed.kernels import threshold_to_bits

Array = jax.Array

__all__ = ["ChainPlan", "plan_ops", "map_shapes", "compile_thresholds", "chain_forward"]



# ------------------------------------------------------------------------- plan


def plan_ops(model: nn.Module) -> list[Step] | None:
    """The model's own chain (``model.chain()``, :class:`binax.models.common.Step`), or
    None when it has none (residual networks run on the generic runtime)."""
    chain = getattr(model, "chain", None)
    return None if chain is None else chain()


def map_shapes(ops: Sequence[Step], calls: Mapping[tuple, Any], input_shape: Sequence[int]) -> dict:
    """``{dense path: (H, W, C)}`` for dense layers fed by a flattened ``H×W×C`` map."""
    shape = (1, *input_shape)
    out = {}
    flattened_from = None
    for op in ops:
        if op.kind == "flatten":
            flattened_from = shape if len(shape) == 4 else None
            shape = (shape[0], int(np.prod(shape[1:])))
            continue
        if op.kind == "activation" and op.activation == "none":
            continue  # e.g. VGG's classifier_act: the dense layer after it still reads the map
        if op.kind == "layer" and flattened_from is not None:
            out[op.path] = tuple(flattened_from[1:])
        if op.kind in ("layer", "block"):
            shape = calls[op.path].out_shape
        elif op.kind == "max_pool":
            shape = jax.eval_shape(lambda x: _max_pool(op, x), jax.ShapeDtypeStruct(shape, jnp.float32)).shape
        flattened_from = None
    return out


def _max_pool(op: Step, x: Array) -> Array:
    return nn.max_pool(x, op.window, op.strides, op.padding)


# ------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class Block:
    """``bn_sign_block``: BatchNorm then the model's activation, or a BinaryBatchNorm."""

    path: tuple[str, ...]
    norm: nn.Module  # unbound nn.BatchNorm, or a layer whose output is binary (BinaryBatchNorm)
    activation: str  # applied after a BatchNorm (common.apply_activation)
    act_module: nn.Module | None  # an unbound RPReLU for 'rprelu'

    def variables(self, float_vars: Mapping) -> dict:
        """The block's variables out of a model's variable tree."""
        out = {"norm": {}, "act": {}}
        for col, tree in float_vars.items():
            node = subtree(tree, self.path)
            if node is not None:
                out["norm"][col] = node
            if self.act_module is not None:
                node = subtree(tree, self.act_path)
                if node is not None:
                    out["act"][col] = node
        return out

    @property
    def act_path(self) -> tuple[str, ...]:
        return self.path[:-1] + (self.path[-1] + "_act",)

    def apply(self, bvars: Mapping, y: Array) -> Array:
        z = self.norm.apply(bvars["norm"], y)
        if layers.describe(self.norm).binary_output:
            return z  # BN -> sign in one layer: no activation follows
        if self.act_module is not None:
            return self.act_module.apply(bvars["act"], z)
        fn = common.activation_fn(self.activation)
        return z if fn is None else fn(z)


def subtree(tree: Mapping, path: Sequence[str]) -> Any:
    """``tree[path[0]][path[1]]...``, or None where the path leaves the tree (a layer
    without that variable collection)."""
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def make_block(model: nn.Module, path: tuple[str, ...], calls: Mapping) -> Block:
    norm = calls[path].module.clone(parent=None)
    act_path = path[:-1] + (path[-1] + "_act",)
    act = calls[act_path].module.clone(parent=None) if act_path in calls else None
    return Block(path, norm, getattr(model, "activation", "none"), act)


def _activation(name: str, module: nn.Module | None, variables: Mapping, x: Array) -> Array:
    if module is not None:
        return module.apply(variables, x)
    fn = common.activation_fn(name)
    return x if fn is None else fn(x)


# ------------------------------------------------------------------------- plan


@dataclasses.dataclass
class ChainPlan:
    """Ops, the exported layers by path, the blocks, and which blocks are fused."""

    ops: list[Step]
    layers: dict[tuple, PackedLayer]
    blocks: dict[tuple, Block]
    modules: dict[tuple, nn.Module]  # unbound clones of every called module
    fused: dict[tuple, dict]  # block path -> {"producer": path, "consumer": path}
    not_fused: dict[tuple, str]  # block path -> why


# ------------------------------------------------------------------------- forward


def _or_pool(words: Array, op: Step) -> Array:
    """Max-pool of packed booleans: bitwise OR of the words in each window."""
    dims = (1, *op.window, 1)
    st = (1, *op.strides, 1)
    return lax.reduce_window(words, np.uint32(0), lax.bitwise_or, dims, st, op.padding)


def _to_bits(acc: Array, threshold: Array, flip: Array, pools: Sequence[Step]) -> Array:
    """``(P, N, ..., ceil(C/32))`` packed planes from accumulators, pooled on the words."""
    planes = []
    for p in range(threshold.shape[0]):
        if not pools:
            planes.append(threshold_to_bits(acc, threshold[p], flip[p]))
            continue
        words = pack_bits(acc >= threshold[p])
        for pool in pools:
            words = _or_pool(words, pool)
        planes.append(words ^ pack_bits(flip[p]))
    return jnp.stack(planes)


def chain_forward(plan: ChainPlan, arrays: Mapping, float_vars: Mapping, x: Array) -> Array:
    """Runs the ops: packed bits between fused blocks, float elsewhere."""
    state, val = "float", x
    producer: PackedLayer | None = None
    pools: list[Step] = []

    def to_float():
        nonlocal state, val, pools
        if state == "int":
            for pool in pools:
                val = _max_pool(pool, val)
            val = producer.decode(arrays["layers"][producer.path], val)
            pools = []
        elif state == "bits":
            raise AssertionError("packed planes reached a float op; the fusion plan is inconsistent")
        state = "float"

    for op in plan.ops:
        kind = op.kind
        if kind == "flatten":
            if state == "bits":
                continue  # per-pixel words stay; the next (map-layout) layer reads them
            to_float()
            val = val.reshape(val.shape[0], -1)
        elif kind == "max_pool":
            if state == "int":
                pools.append(op)
            elif state == "bits":
                val = jnp.stack([_or_pool(w, op) for w in val])
            else:
                val = _max_pool(op, val)
        elif kind == "activation":
            if op.activation != "none":
                to_float()
                module = plan.modules.get(op.path)
                variables = {col: t[op.path[0]] for col, t in float_vars.items() if op.path[0] in t}
                val = _activation(op.activation, module, variables, val)
        elif kind == "layer":
            path = op.path
            layer = plan.layers.get(path)
            if layer is not None and layer.packed:
                la = arrays["layers"][path]
                if state != "bits":
                    to_float()
                    val = layer.encode(la, val)
                acc = layer.accumulate(la, val)
                if layer.integer_output:
                    state, val, producer, pools = "int", acc, layer, []
                else:
                    state, val = "float", layer.decode(la, acc)
            else:
                to_float()
                if layer is not None:
                    val = layer.float_apply(arrays["layers"][path], val)
                else:
                    module = plan.modules[path]
                    found = {col: subtree(t, path) for col, t in float_vars.items()}
                    variables = {col: v for col, v in found.items() if v is not None}
                    val = module.apply(variables, val, 1.0)
        elif kind == "block":
            path = op.path
            if path in plan.fused:
                th = arrays["thresholds"][path]
                val, state = _to_bits(val, th["threshold"], th["flip"], pools), "bits"
                pools = []
            else:
                to_float()
                block = plan.blocks[path]
                val = block.apply(block.variables(float_vars), val)
        else:
            raise AssertionError(f"unknown chain step {op!r}")
    to_float()
    return val
