"""What arrays a packed model file must hold for the model it names.

:func:`expected_arrays` derives every array's key, dtype and shape from the rebuilt
model's abstract variables (:func:`binax.models.trace`) and the layout facts of the file's
``meta["layers"]`` (checked for consistency with the model on the way);
:func:`check_arrays` compares the file with it: nothing missing, nothing else, the right
dtypes and shapes, finite floats. Each failure is one
:class:`binax.errors.PackedFileError` naming the file.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from binax import layers
from binax.export.packed_file import check_code, fail

__all__ = ["expected_arrays", "check_arrays"]


def _words(n: int) -> int:
    return -(-int(n) // 32)


def _int(info: Mapping, key: str, where: str, path) -> int:
    v = info.get(key)
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        raise fail(path, f"{where}.{key} must be a non-negative int; got {v!r:.80}.")
    return v


def _layer_arrays(key: str, entry: Mapping, module, params: Mapping, path) -> dict[str, tuple]:
    """``{name: (dtype, shape)}`` a layer entry must store, from the rebuilt module's
    abstract parameters and the entry's layout facts."""
    kind, info = entry["kind"], entry["info"]
    where = f"layers[{key!r}].info"
    latent = params["latent_kernel"] if "latent_kernel" in params else params["kernel"]
    shape = tuple(latent.shape)
    out_ch = shape[-1]
    f32, u32 = np.dtype(np.float32), np.dtype(np.uint32)
    want: dict[str, tuple] = {}
    folded = bool(info.get("scale_in_thresholds"))
    if "bias" in params and not folded:
        want["bias"] = (f32, (out_ch,))
    abc = kind == "abc" or (kind == "float_input" and "shifts" in params)
    if abc:
        bases = layers.describe(module).bases
        m = _int(info, "m", where, path) if kind == "float_input" else (bases(module)[0] if bases else 0)
        want.update(alphas=(f32, (m,)), betas=(f32, tuple(params["betas"].shape)), shifts=(f32, tuple(params["shifts"].shape)))
    if kind == "float":
        want["kernel"] = (f32, shape)
        return want
    if kind == "float_input":
        axis = _int(info, "pack_axis", where, path)
        if axis >= len(shape):
            raise fail(path, f"{where}.pack_axis = {axis} is not an axis of the kernel {shape}.")
        packed = shape[:axis] + (_words(shape[axis]),) + shape[axis + 1 :]
        want["bits"] = (u32, ((m,) if abc else ()) + packed)
        if not abc:
            want["alpha"] = (f32, (out_ch,))
        return want
    layout = info.get("layout")
    outputs = out_ch * (m if abc else 1)
    if layout == "dense" and len(shape) == 2:
        channels, bits = shape[0], (_words(shape[0]), outputs)
    elif layout == "conv" and len(shape) >= 3:
        channels, bits = shape[-2], shape[:-2] + (_words(shape[-2]), outputs)
    elif layout == "map" and len(shape) == 2:
        ms = info.get("map_shape")
        if not (isinstance(ms, list) and len(ms) == 3 and all(isinstance(v, int) and v > 0 for v in ms)) or math.prod(ms) != shape[0]:
            raise fail(path, f"{where}.map_shape = {ms!r:.80} is not (H, W, C) of the layer's {shape[0]} inputs.")
        channels, bits = ms[2], (ms[0], ms[1], _words(ms[2]), outputs)
    else:
        raise fail(path, f"{where}.layout = {layout!r:.80} does not fit the layer's kernel {shape}.")
    if info.get("in_channels") != channels:
        raise fail(path, f"{where}.in_channels = {info.get('in_channels')!r:.80}; the layer has {channels}.")
    if kind == "xnor":
        if info.get("column_sums_n") != math.prod(shape[:-1]):
            raise fail(path, f"{where}.column_sums_n = {info.get('column_sums_n')!r:.80}; the layer has {math.prod(shape[:-1])} inputs.")
        if not folded:
            want["alpha"] = (f32, (out_ch,))
    want["bits"] = (u32, bits)
    return want


def expected_arrays(meta: Mapping[str, Any], calls: Mapping[tuple, Any], abstract: Mapping, path) -> dict[str, tuple]:
    """``{key: (dtype, shape)}`` of every array the file must hold for the rebuilt model
    (``calls``/``abstract``: :func:`binax.models.trace` of it)."""
    params = abstract.get("params", {})
    want: dict[str, tuple] = {}
    skip: set[tuple] = set()
    for key, entry in meta["layers"].items():
        p = tuple(key.split("/"))
        call = calls.get(p)
        if call is None or layers.describe(call.module).export is None:
            raise fail(path, f"layers[{key!r}] is not a quantized layer of this {meta['model'] or meta['model_class']}.")
        if "code" in entry["info"]:  # what the runtime quantizes inputs with: registered here
            check_code(entry["info"]["code"], f"layers[{key!r}].info.code", path, must_exist=True)
        node = params
        for k in p:
            node = node.get(k, {})
        for name, spec in _layer_arrays(key, entry, call.module, node, path).items():
            want[f"layers/{key}/{name}"] = spec
        skip.add(p)
    for block, entry in meta.get("fused", {}).items() if meta["runtime"] == "chain" else ():
        producer = meta["layers"]["/".join(entry["producer"])]
        consumer = meta["layers"]["/".join(entry["consumer"])]
        if producer["kind"] != "xnor" or consumer["kind"] != "xnor" or "code" not in consumer["info"]:
            raise fail(path, f"fused[{block!r}] must join two xnor layers.")
        out_ch = want[f"layers/{'/'.join(entry['producer'])}/bits"][1][-1]
        planes = consumer["info"]["code"]["planes"]
        want[f"thresholds/{block}/threshold"] = (np.dtype(np.int32), (planes, out_ch))
        want[f"thresholds/{block}/flip"] = (np.dtype(np.bool_), (planes, out_ch))
        skip.add(tuple(block.split("/")))
    for col, tree in abstract.items():
        for p, leaf in traverse_util.flatten_dict(unfreeze(tree)).items():
            if not any(p[: len(s)] == s for s in skip):
                want["variables/" + "/".join((col,) + p)] = (np.dtype(np.float32), tuple(leaf.shape))
    if meta["preprocessing"].get("normalize") is not None:
        want["preprocessing/table"] = (np.dtype(np.float32), (meta["input_shape"][-1], meta["preprocessing"].get("max_value", 255) + 1))
    return want


def check_arrays(arrays: Mapping[str, np.ndarray], want: Mapping[str, tuple], path) -> None:
    """Every wanted array present with its dtype and shape, nothing else, floats finite."""
    for key, (dtype, shape) in want.items():
        if key not in arrays:
            raise fail(path, f"missing array {key!r} ({dtype}{list(shape)}).")
        arr = arrays[key]
        if arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
            raise fail(path, f"array {key!r} is {arr.dtype}{list(arr.shape)}; the model needs {dtype}{list(shape)}.")
        if dtype.kind == "f" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise fail(path, f"array {key!r} holds {bad} non-finite value(s) (NaN or infinity).")
    extra = sorted(set(arrays) - set(want))
    if extra:
        raise fail(path, f"unexpected array(s) {extra[:3]} (not part of this model).")
