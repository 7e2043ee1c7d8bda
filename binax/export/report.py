"""What a packed model runs packed and what in float, layer by layer (``PackedModel.report``)."""

from __future__ import annotations

import dataclasses

from binax import layers
from binax.export.packed_layer import PackedLayer

__all__ = ["LayerRow", "rows", "report"]


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One line of :meth:`PackedModel.report`."""

    path: str
    kind: str  # layer class
    compute: str  # how it runs
    stored: str  # what the file holds for it
    note: str = ""



def rows(packed) -> list[LayerRow]:
    """Per-layer facts of a :class:`binax.export.runtime.PackedModel`: every quantized
    layer, every float dense/conv layer, and for the chain every BatchNorm block."""
    out = []
    stored = {}
    for key, arr in packed.arrays().items():
        if key.startswith(("layers/", "thresholds/")):
            path = "/".join(key.split("/")[1:-1])
            stored.setdefault(path, []).append(f"{key.split('/')[-1]} {arr.dtype}{list(arr.shape)}")
    plan = packed._plan
    for path, call in packed._calls.items():
        key = "/".join(path)
        layer = packed.layers.get(path)
        desc = layers.describe(call.module)
        cls = desc.kind(call.module)  # the summary's words for the same layer
        held = ", ".join(stored.get(key, []))
        if layer is not None:
            out.append(LayerRow(key, cls, _compute_text(layer), held, packed.meta["layers"][key].get("note", "")))
        elif plan is not None and path in plan.blocks:
            if path in plan.fused:
                producer = "/".join(plan.fused[path]["producer"])
                out.append(LayerRow(key, cls, f"fused: int32 of {producer} >= threshold -> packed bits", held))
            else:
                out.append(LayerRow(key, cls, "float", "float32 variables", plan.not_fused.get(path, "")))
        elif desc.has_macs:
            out.append(LayerRow(key, cls, "float", "float32 variables"))
    return out


def report(packed) -> str:
    """A table of what runs packed (XOR-popcount) and what runs in float, layer by layer."""
    head = ("layer", "type", "compute", "stored", "note")
    table = [head] + [(r.path, r.kind, r.compute, r.stored, r.note) for r in rows(packed)]
    widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
    lines = [
        f"{packed.name} packed model (runtime {packed.runtime!r}, input {packed.input_shape}, "
        f"{packed.nbytes:,} bytes of arrays)",
        f"preprocessing: {packed.preprocessing.describe()}",
    ]
    for i, t in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(t, widths)).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    n_packed = sum(1 for r in packed.layers.values() if r.packed)
    lines.append(f"{n_packed} of {len(packed.layers)} quantized layers run on XOR-popcount.")
    return "\n".join(lines)


def _compute_text(layer: PackedLayer) -> str:
    if layer.kind == "xnor":
        code = layer.code
        planes = f"{code.planes} planes" if code.planes > 1 else "1 plane"
        then = "thresholds" if layer.info.get("scale_in_thresholds") else "x scale"
        return f"xor-popcount ({code.quantizer}: {planes}) -> int32 -> {then}"
    if layer.kind == "abc":
        m, n = layer.descriptor.bases(layer.module)
        return f"xor-popcount ({m}·{n} = {m * n} binary ops per MAC)"
    if layer.kind == "float_input":
        return "float (kernel unpacked from bits)"
    return "float"

