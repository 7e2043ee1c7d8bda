"""The packed chain: sequential models whose binary layers pass packed bits to each other.

For a chain ``binary layer → [max-pool] → BatchNorm → activation → quantizer → binary
layer`` (``bnn_mlp``, the VGG family, AlexNet), everything between two binary layers is a
function of ONE integer per output channel: the accumulator ``a`` of the first layer
(its float output is ``a·scale_c (+ bias_c)`` with ``scale_c >= 0``). Each input plane of
the next layer is therefore a boolean function of ``a``, per channel; when it is monotone
it is ``(a >= t_c) XOR flip_c`` (BinaryBN: ``sign(BN(x)) = sign(γ)·sign(x − τ)``), and the
next layer's packed bits come straight from the int32 accumulators
(:func:`binax.packed.threshold_to_bits`), with no float activation in between.

The thresholds are not derived from the BatchNorm formula but read off the float
computation itself: the block (the model's own BatchNorm/BinaryBatchNorm, activation and
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

from binax import folding, layers
from binax.export.inference import PackedLayer
from binax.models import common
from binax.models.common import Step
from binax.packed.bits import pack_bits
from binax.packed.kernels import threshold_to_bits

Array = jax.Array

__all__ = ["ChainPlan", "plan_ops", "map_shapes", "compile_thresholds", "chain_forward"]

# Thresholds beyond ±2**30 act as ±inf (binax.packed.kernels._INT_INF).
_INT_INF = 2**30
# Booleans per jitted evaluation of a block while searching thresholds.
_EVAL_CHUNK = 1 << 22


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
            node = _get(tree, self.path)
            if node is not None:
                out["norm"][col] = node
            if self.act_module is not None:
                node = _get(tree, self.act_path)
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


def _get(tree: Mapping, path: Sequence[str]):
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


def fusion_candidates(ops: Sequence[Step], layers: Mapping[tuple, PackedLayer]) -> tuple[dict, dict]:
    """Which blocks sit between an integer-output packed layer and a packed layer.

    Returns ``({block: (producer, consumer)}, {block: reason})``.
    """
    cands, reasons = {}, {}
    for i, op in enumerate(ops):
        if op.kind != "block":
            continue
        j = i - 1
        while j >= 0 and ops[j].kind == "max_pool":
            j -= 1
        producer = ops[j].path if j >= 0 and ops[j].kind == "layer" else None
        k = i + 1
        while k < len(ops) and (ops[k].kind == "flatten" or (ops[k].kind == "activation" and ops[k].activation == "none")):
            k += 1
        consumer = ops[k].path if k < len(ops) and ops[k].kind == "layer" else None
        prod = layers.get(producer)
        cons = layers.get(consumer)
        if prod is None or not prod.integer_output:
            reasons[op.path] = "input is not one integer accumulator per channel (float or ABC layer before it)"
        elif cons is None or not cons.packed:
            reasons[op.path] = "its output feeds a float layer"
        elif not cons.integer_output:
            reasons[op.path] = "its output feeds an ABC-Net layer (shifted planes: not fused)"
        else:
            cands[op.path] = (producer, consumer)
    return cands, reasons


def accumulator_bound(layer: PackedLayer) -> int:
    """``A`` with ``|acc| <= A``: ``(P + |c0|)·n`` for ``n`` inputs per output."""
    code = layer.code
    return (code.planes + abs(code.offset)) * int(layer.info["column_sums_n"])


def _grid(producer: PackedLayer, producer_arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """``fl(a·scale) (+ bias)`` for every ``a ∈ [−A, A]`` (rows) and the channels ``idx``."""
    big = accumulator_bound(producer)
    grid = np.arange(-big, big + 1, dtype=np.int64).astype(np.float32)[:, None]
    y = grid * np.asarray(producer_arrays["scale"], np.float32)[idx][None, :]
    bias = producer_arrays.get("bias")
    if bias is not None:
        y = y + np.asarray(bias, np.float32)[idx][None, :]
    return y.astype(np.float32)


def _thresholds(bits: np.ndarray, big: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(t, flip)`` from planes ``(P, R, C)`` over ``a = −A..A`` (:func:`binax.folding.scan_steps`);
    None if one is not monotone."""
    steps = folding.scan_steps(bits, -big)
    if not np.all(steps.monotone):  # a plane changes back
        return None
    # a < t: the plane is its value at -A; a >= t: the other. (acc >= t) XOR flip gives both.
    return steps.thresholds(-_INT_INF).astype(np.int32), steps.flips.astype(bool)


@dataclasses.dataclass
class _Search:
    producer: PackedLayer
    producer_arrays: Mapping[str, np.ndarray]
    block: Block
    block_vars: Mapping
    consumer: PackedLayer

    @property
    def channels(self) -> int:
        return int(np.asarray(self.producer_arrays["scale"]).size)

    @property
    def size(self) -> int:
        return (2 * accumulator_bound(self.producer) + 1) * self.channels * self.consumer.n_planes()

    def planes(self, bvars, y):
        return self.consumer.code.plane_bits(self.block.apply(bvars, y))


def search_thresholds(searches: Sequence[_Search]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """``(threshold (P, C) int32, flip (P, C) bool)`` per search, None where not monotone.

    Evaluates ``planes(block(fl(a·scale) + bias))`` for every integer ``a`` in
    ``[−A, A]`` (:func:`accumulator_bound`) and every channel, jitted as the model is:
    all searches in one compilation when they fit ``_EVAL_CHUNK`` booleans, else each in
    channel chunks.
    """
    if not searches:
        return []
    if sum(s.size for s in searches) <= _EVAL_CHUNK:
        ys = [_grid(s.producer, s.producer_arrays, np.arange(s.channels)) for s in searches]
        fn = jax.jit(lambda bvs, ys: [s.planes(bv, y) for s, bv, y in zip(searches, bvs, ys)])
        outs = fn([s.block_vars for s in searches], ys)
        return [_thresholds(np.asarray(o), accumulator_bound(s.producer)) for s, o in zip(searches, outs)]
    return [_search_chunked(s) for s in searches]


def _search_chunked(s: _Search):
    r = 2 * accumulator_bound(s.producer) + 1
    c, p = s.channels, s.consumer.n_planes()
    chunk = int(max(1, min(c, _EVAL_CHUNK // max(1, r * p))))
    fn = jax.jit(s.planes)
    bits = np.empty((p, r, c), bool)
    for start in range(0, c, chunk):
        idx = np.minimum(np.arange(start, start + chunk), c - 1)  # the last chunk repeats a channel
        bv = jax.tree.map(lambda v: np.asarray(v)[idx], s.block_vars)
        out = np.asarray(fn(bv, _grid(s.producer, s.producer_arrays, idx)))
        n = min(chunk, c - start)
        bits[:, :, start : start + n] = out[:, :, :n]
    return _thresholds(bits, accumulator_bound(s.producer))


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
                    variables = {col: _get(t, path) for col, t in float_vars.items() if _get(t, path) is not None}
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


def compile_thresholds(
    plan: ChainPlan, layer_arrays: Mapping[tuple, Mapping], variables: Mapping
) -> dict[tuple, dict[str, np.ndarray]]:
    """Searches the thresholds of every fusable block; fills ``plan.fused``/``plan.not_fused``."""
    cands, reasons = fusion_candidates(plan.ops, plan.layers)
    plan.not_fused.update(reasons)
    searches = [
        _Search(
            plan.layers[producer],
            layer_arrays[producer],
            plan.blocks[path],
            plan.blocks[path].variables(variables),
            plan.layers[consumer],
        )
        for path, (producer, consumer) in cands.items()
    ]
    out = {}
    for (path, (producer, consumer)), found in zip(cands.items(), search_thresholds(searches)):
        if found is None:
            plan.not_fused[path] = "not monotone in the accumulator (e.g. a negative RPReLU slope)"
            continue
        plan.fused[path] = {"producer": list(producer), "consumer": list(consumer)}
        out[path] = {"threshold": found[0], "flip": found[1]}
    return out
