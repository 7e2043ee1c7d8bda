"""The packed chain's thresholds: where a block's output planes change, per channel.

Between two binary layers of a chain, ``[max-pool →] BatchNorm → activation → quantizer``
is a function of one integer per output channel, the first layer's accumulator ``a``.
The thresholds are not derived from the BatchNorm formula but read off the float
computation itself: the block (the model's own modules, jitted as in the model) is
evaluated on EVERY reachable accumulator value ``a ∈ [−A, A]`` for every channel, and
``t``/``flip`` are where each output plane changes (:func:`binax.folding.scan_steps`),
so ``(a >= t) XOR flip`` reproduces the float graph bit for bit. A block that is not
monotone in ``a`` (an RPReLU with a negative slope) is not fused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from binax import folding
from binax.export.packed_layer import PackedLayer
from binax.models.common import Step

__all__ = ["fusion_candidates", "accumulator_bound", "search_thresholds", "compile_thresholds"]

# Thresholds beyond ±2**30 act as ±inf (binax.packed.kernels._INT_INF).
_INT_INF = 2**30
# Booleans per jitted evaluation of a block while searching thresholds.
_EVAL_CHUNK = 1 << 22


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
    block: Any  # binax.export.chain.Block
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


def compile_thresholds(
    plan, layer_arrays: Mapping[tuple, Mapping], variables: Mapping
) -> dict[tuple, dict[str, np.ndarray]]:
    """Searches the thresholds of every fusable block of ``plan`` (a
    :class:`binax.export.chain.ChainPlan`); fills ``plan.fused``/``plan.not_fused``."""
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
