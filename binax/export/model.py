"""The packed model file and packed inference for every binax model.

``export(name, config, variables, input_shape)`` turns a trained model (registry name,
config overrides, ``{params, batch_stats}``) into a :class:`PackedModel`:

* every quantized layer's kernel is evaluated by its quantizer and stored as sign bits,
  32 per ``uint32`` word along the reduction axis, with its scale (XNOR ``α``, Libra-PB's
  power of two, BinaryDuo's per-layer mean, ABC-Net's ``α_m`` and ``β_n``/shifts); the
  latent float weights are not stored;
* everything else (full-precision first/last layers, BatchNorms that feed float
  computations, shortcuts, RPReLU ...) keeps its float32 variables as they are.

Two runtimes, chosen per model (``runtime="auto"``):

* ``"chain"`` (``bnn_mlp``, ``cnn_small``, ``vgg_small``, ``vgg7_tiny``, ``alexnet``:
  :mod:`binax.export.chain`): binary layers hand packed bits to each other through
  integer thresholds that replace ``[max-pool →] BatchNorm → activation → quantizer``,
  so there is no float activation between two binary layers; those BatchNorms are stored
  only as thresholds.
* ``"generic"`` (every model, e.g. ResNets with float shortcuts, ReActNet's RPReLU): the
  model's own Flax module runs under ``flax.linen.intercept_methods``, and each quantized
  layer's ``__call__`` is replaced by its packed computation (quantize the input into
  bit planes → pack → XOR-popcount against the packed kernel → int32 → × scale
  (+ bias)); float parts run as in training.

Both are exact for binary layers (integer accumulators) and reproduce the training
graph's eval-mode logits (``model.apply(variables, x, train=False, progress=1.0)``) up to
float rounding (bit for bit where the layer scales are powers of two). ``report()`` says,
layer by layer, what runs packed and what runs in float, and why.

The file is ONE ``.npz``: arrays under ``variables/…``, ``layers/…`` and
``thresholds/…`` plus a JSON ``meta`` entry (format name and version, model name,
config, input shape, runtime, per-layer facts). :func:`load` needs ``binax.models`` (to
rebuild the module) but not ``binax.train`` and no latent weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

import binax
from binax import models
from binax.export import chain as chain_lib
from binax.export.inference import (
    EXPORTED_TYPES,
    LayerExport,
    PackedLayer,
    derived_arrays,
    export_layer,
    kernel_request,
    quantize_kernels,
)
from binax.packed.kernels import CPU_COMPILER_OPTIONS

Array = jax.Array

__all__ = ["FORMAT", "FORMAT_VERSION", "RUNTIMES", "PackedModel", "export", "load", "save", "inference_config"]

FORMAT = "binax.export.packed_model"
FORMAT_VERSION = 1
RUNTIMES = ("auto", "chain", "generic")


# ------------------------------------------------------------------------- config


def _jsonable(value, where: str):
    """Config values as JSON (dicts, lists, str, numbers, bools, None); callables refused."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(
        f"config value {where} = {value!r} cannot be stored in a packed model file; use registry "
        f"names (binax.binarizers.names()) and plain numbers, strings, lists and dicts."
    )


def inference_config(config: Mapping[str, Any]) -> dict:
    """The config a model runs at inference: ``config`` with
    :func:`binax.models.inference_overrides` (e.g. ``tanh_sign`` quantizers become ``sign``)."""
    return {**dict(config), **models.inference_overrides(config)}


# ------------------------------------------------------------------------- trace


def trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[tuple, models.Call], Any]:
    """The first call of every submodule of ``model`` by path, and the abstract variables
    (:func:`binax.models.trace`)."""
    calls, variables = models.trace(model, input_shape)
    first: dict[tuple, models.Call] = {}
    for call in calls:
        if call.path and call.path not in first:
            first[call.path] = call
    return first, variables


# ------------------------------------------------------------------------- trees


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _subtree(tree: Mapping, path: Sequence[str]) -> Mapping | None:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _check_variables(variables: Mapping, abstract: Mapping) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(f"variables must be a dict with 'params' (and 'batch_stats'); got {type(variables).__name__}.")
    want = {p: tuple(v.shape) for p, v in _flatten(unfreeze(abstract)).items()}
    have = {p: tuple(np.shape(v)) for p, v in _flatten(unfreeze(dict(variables))).items()}
    missing = sorted("/".join(p) for p in set(want) - set(have))
    if missing:
        raise ValueError(f"variables lack {len(missing)} entries the model needs, e.g. {missing[:3]}.")
    wrong = sorted("/".join(p) + f" {have[p]} != {want[p]}" for p in want if have[p] != want[p])
    if wrong:
        raise ValueError(f"variables have the wrong shape for this config and input shape: {wrong[:3]}.")


# ------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One line of :meth:`PackedModel.report`."""

    path: str
    kind: str  # layer class
    compute: str  # how it runs
    stored: str  # what the file holds for it
    note: str = ""


class PackedModel:
    """A packed inference model: ``model(images) -> logits`` and ``model.report()``.

    Build one with :func:`export` or :func:`load`; :meth:`save` writes the file.
    ``images`` are what the training pipeline feeds the model (float NHWC,
    ``(N, *input_shape)``).
    """

    def __init__(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, _traced=None):
        self.meta = json.loads(json.dumps(meta))  # a plain copy
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.name = self.meta["model"]
        self.config = self.meta["config"]
        self.input_shape = tuple(self.meta["input_shape"])
        self.runtime = self.meta["runtime"]
        if _traced is None:  # (model, calls) when export() has them already
            model = models.create(self.name, **inference_config(self.config))
            _traced = (model, trace(model, self.input_shape)[0])
        self.model, calls = _traced
        self._calls = calls
        self.layers: dict[tuple, PackedLayer] = {}
        for key, entry in self.meta["layers"].items():
            path = tuple(key.split("/"))
            self.layers[path] = PackedLayer(path, calls[path].module, entry["kind"], entry["info"])
        self._plan = self._make_plan() if self.runtime == "chain" else None
        self._device_arrays = jax.device_put(self._runtime_arrays())
        opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        self._forward = jax.jit(self._run, compiler_options=opts)

    # ---- construction

    def _make_plan(self) -> chain_lib.ChainPlan:
        ops = chain_lib.plan_ops(self.model)
        blocks = {op.path: chain_lib.make_block(self.model, op.path, self._calls) for op in ops if op.kind == "block"}
        fused = {tuple(k.split("/")): v for k, v in self.meta.get("fused", {}).items()}
        not_fused = {tuple(k.split("/")): v for k, v in self.meta.get("not_fused", {}).items()}
        modules = {p: c.module for p, c in self._calls.items()}
        return chain_lib.ChainPlan(ops, self.layers, blocks, modules, fused, not_fused)

    def _group(self, prefix: str) -> dict[tuple, dict[str, np.ndarray]]:
        out: dict[tuple, dict[str, np.ndarray]] = {}
        for key, arr in self._arrays.items():
            if key.startswith(prefix + "/"):
                *path, name = key[len(prefix) + 1 :].split("/")
                out.setdefault(tuple(path), {})[name] = arr
        return out

    def _runtime_arrays(self) -> dict:
        layers = self._group("layers")
        for path, layer in self.layers.items():
            arrays = layers.setdefault(path, {})
            arrays.update(derived_arrays(LayerExport(layer.kind, arrays, dict(layer.info))))
        variables = {}
        for key, arr in self._arrays.items():
            if key.startswith("variables/"):
                variables[tuple(key.split("/")[1:])] = arr
        return {
            "layers": layers,
            "thresholds": self._group("thresholds"),
            "variables": _unflatten(variables),
        }

    # ---- inference

    def _run(self, arrays, images):
        float_vars = arrays["variables"]
        if self._plan is not None:
            return chain_lib.chain_forward(self._plan, arrays, float_vars, images)
        layers = self.layers

        def interceptor(next_fun, args, kwargs, context):
            path = tuple(context.module.path)
            layer = layers.get(path) if context.method_name == "__call__" else None
            if layer is None:
                return next_fun(*args, **kwargs)
            la = arrays["layers"][path]
            x = args[0]
            if layer.packed:
                return layer.decode(la, layer.accumulate(la, layer.encode(la, x)))
            return layer.float_apply(la, x)

        with nn.intercept_methods(interceptor):
            return self.model.apply(float_vars, images, train=False, progress=1.0)

    def __call__(self, images) -> Array:
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != len(self.input_shape) + 1 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"{self.name} was exported for images of shape (N, {', '.join(map(str, self.input_shape))}); "
                f"got {tuple(images.shape)}."
            )
        return self._forward(self._device_arrays, images)

    # ---- sizes and report

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (the file adds its zip and header overhead)."""
        return int(sum(a.nbytes for a in self._arrays.values()))

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored arrays by file key (read-only views)."""
        return dict(self._arrays)

    def rows(self) -> list[LayerRow]:
        """Per-layer facts: every quantized layer, and for the chain every BatchNorm block."""
        rows = []
        stored = {}
        for key, arr in self._arrays.items():
            if key.startswith(("layers/", "thresholds/")):
                path = "/".join(key.split("/")[1:-1])
                stored.setdefault(path, []).append(f"{key.split('/')[-1]} {arr.dtype}{list(arr.shape)}")
        for path, call in self._calls.items():
            key = "/".join(path)
            layer = self.layers.get(path)
            cls = type(call.module).__name__
            if layer is not None:
                rows.append(LayerRow(key, cls, _compute_text(layer), ", ".join(stored.get(key, [])), self.meta["layers"][key].get("note", "")))
            elif self._plan is not None and path in self._plan.blocks:
                if path in self._plan.fused:
                    producer = "/".join(self._plan.fused[path]["producer"])
                    rows.append(LayerRow(key, cls, f"fused: int32 of {producer} >= threshold -> packed bits", ", ".join(stored.get(key, []))))
                else:
                    rows.append(LayerRow(key, cls, "float", "float32 variables", self._plan.not_fused.get(path, "")))
            elif isinstance(call.module, EXPORTED_TYPES + (nn.Dense, nn.Conv)):
                rows.append(LayerRow(key, cls, "float (not quantized)", "float32 variables"))
        return rows

    def report(self) -> str:
        """A table of what runs packed (XOR-popcount) and what runs in float, layer by layer."""
        rows = self.rows()
        head = ("layer", "type", "compute", "stored", "note")
        table = [head] + [(r.path, r.kind, r.compute, r.stored, r.note) for r in rows]
        widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
        lines = [
            f"{self.name} packed model (runtime {self.runtime!r}, input {self.input_shape}, "
            f"{self.nbytes:,} bytes of arrays)"
        ]
        for i, t in enumerate(table):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(t, widths)).rstrip())
            if i == 0:
                lines.append("-" * len(lines[-1]))
        packed = sum(1 for r in self.layers.values() if r.packed)
        lines.append(f"{packed} of {len(self.layers)} quantized layers run on XOR-popcount.")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> int:
        """Writes the model to ``path`` (one ``.npz``); returns the file size in bytes."""
        return save(self, path)


def _compute_text(layer: PackedLayer) -> str:
    if layer.kind == "xnor":
        code = layer.code
        planes = f"{code.planes} planes" if code.planes > 1 else "1 plane"
        then = "thresholds" if layer.info.get("scale_in_thresholds") else "x scale"
        return f"xor-popcount ({code.quantizer}: {planes}) -> int32 -> {then}"
    if layer.kind == "abc":
        return f"xor-popcount (ABC {layer.module.m} bases x {layer.module.n} activations)"
    if layer.kind == "float_input":
        return "float (kernel unpacked from bits)"
    return "float"


# ------------------------------------------------------------------------- export


def export(
    model_name: str,
    config: Mapping[str, Any] | None,
    variables: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    runtime: str = "auto",
    progress: float = 1.0,
) -> PackedModel:
    """Packs a trained model for inference.

    Args:
      model_name: a registry name (``binax.models.names()``).
      config: the overrides the model was created with (``binax.models.create(name,
        **config)``); ``None`` for the defaults. Quantizers must be registry names.
      variables: ``{'params': ..., 'batch_stats': ...}`` of the trained model.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      runtime: ``"auto"`` (the packed chain where the family has a planner, else generic),
        ``"chain"`` or ``"generic"``.
      progress: training progress at which weight quantizers are evaluated (their
        forward does not depend on it for binax's binarizers).

    Returns:
      a :class:`PackedModel`; ``.save(path)`` writes the file.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}; got {runtime!r}.")
    config = _jsonable(dict(config or {}), "config")
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if not shape or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints such as (32, 32, 3); got {input_shape!r}.")
    shape = tuple(int(s) for s in shape)
    model = models.create(model_name, **inference_config(config))
    ops = chain_lib.plan_ops(model)
    if runtime == "chain" and ops is None:
        names = [n for n in models.names() if chain_lib.plan_ops(models.create(n)) is not None]
        raise ValueError(f"{model_name} has no packed-chain plan (models with one: {names}); use runtime='generic'.")
    calls, abstract = trace(model, shape)
    variables = unfreeze(dict(variables))
    _check_variables(variables, abstract)

    use_chain = ops is not None and runtime != "generic"
    map_shapes = chain_lib.map_shapes(ops, calls, shape) if use_chain else {}

    exports: dict[tuple, LayerExport] = {}
    params = variables["params"]
    exported = {p: c.module for p, c in calls.items() if isinstance(c.module, EXPORTED_TYPES)}
    requests = {p: kernel_request(m, _subtree(params, p)) for p, m in exported.items()}
    quantized = quantize_kernels({p: r for p, r in requests.items() if r is not None}, progress)
    for path, module in exported.items():
        e = export_layer(
            module, _subtree(params, path), progress=progress, map_shape=map_shapes.get(path), quantized=quantized.get(path)
        )
        if e is not None:
            exports[path] = e

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "binax_version": binax.__version__,
        "model": model_name,
        "config": config,
        "input_shape": list(shape),
        "runtime": "chain" if use_chain else "generic",
        "progress": float(progress),
        "layers": {"/".join(p): {"kind": e.kind, "info": e.info, "note": e.note} for p, e in exports.items()},
    }
    arrays: dict[str, np.ndarray] = {}
    for path, e in exports.items():
        for name, arr in e.arrays.items():
            arrays["layers/" + "/".join(path + (name,))] = np.asarray(arr)

    skip: set[tuple] = set(exports)  # modules whose float variables are not stored
    if use_chain:
        packed_layers = {p: PackedLayer(p, calls[p].module, e.kind, e.info) for p, e in exports.items()}
        blocks = {op.path: chain_lib.make_block(model, op.path, calls) for op in ops if op.kind == "block"}
        plan = chain_lib.ChainPlan(ops, packed_layers, blocks, {}, {}, {})
        layer_arrays = {p: {**e.arrays, **derived_arrays(e)} for p, e in exports.items()}
        thresholds = chain_lib.compile_thresholds(plan, layer_arrays, variables)
        for path, th in thresholds.items():
            for name, arr in th.items():
                arrays["thresholds/" + "/".join(path + (name,))] = arr
            skip.add(path)
        # A layer whose accumulators only meet thresholds never decodes: its scale and
        # bias live in the thresholds.
        for fused in plan.fused.values():
            key = "/".join(fused["producer"])
            for name in ("alpha", "bias"):
                arrays.pop(f"layers/{key}/{name}", None)
            meta["layers"][key]["info"]["scale_in_thresholds"] = True
        meta["fused"] = {"/".join(p): v for p, v in plan.fused.items()}
        meta["not_fused"] = {"/".join(p): v for p, v in plan.not_fused.items()}

    for col in ("params", "batch_stats"):
        for path, leaf in _flatten(variables.get(col, {})).items():
            if any(path[: len(s)] == s for s in skip):
                continue
            arrays["variables/" + "/".join((col,) + path)] = np.asarray(leaf)
    return PackedModel(meta, arrays, _traced=(model, calls))


# ------------------------------------------------------------------------- file


def save(model: PackedModel, path: str | os.PathLike) -> int:
    """Writes ``model`` as one ``.npz`` (deflate-compressed) and returns its size in bytes."""
    path = os.fspath(path)
    entries = {"meta": np.asarray(json.dumps(model.meta, sort_keys=True))}
    for key, arr in model.arrays().items():
        if key == "meta":
            raise ValueError("'meta' is reserved for the metadata entry.")
        entries[key] = arr
    np.savez_compressed(path, **entries)
    if not path.endswith(".npz") and os.path.exists(path + ".npz"):
        os.replace(path + ".npz", path)
    return os.path.getsize(path)


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a packed model file, checked for the format and its version."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        return _meta(data, path)


def _meta(data, path) -> dict:
    if "meta" not in data.files:
        raise ValueError(f"{path} is not a binax packed model file (no 'meta' entry).")
    meta = json.loads(str(data["meta"]))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r}; this binax reads version {FORMAT_VERSION}."
        )
    return meta


def load(path: str | os.PathLike) -> PackedModel:
    """Reads a packed model file written by :func:`save` / :meth:`PackedModel.save`."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        meta = _meta(data, path)
        arrays = {k: data[k] for k in data.files if k != "meta"}
    return PackedModel(meta, arrays)
