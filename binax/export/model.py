"""The packed model file and packed inference for every binax model.

``export(model, variables, preprocessing=...)`` turns a trained Flax module and its
``{params, batch_stats}`` into a :class:`PackedModel`:

* every quantized layer's kernel is evaluated by its quantizer and stored as sign bits,
  32 per ``uint32`` word along the reduction axis, with its scale (XNOR ``α``, Libra-PB's
  power of two, BinaryDuo's per-layer mean, ABC-Net's ``α_m`` and ``β_n``/shifts); the
  latent float weights are not stored;
* everything else (full-precision first/last layers, BatchNorms that feed float
  computations, shortcuts, RPReLU ...) keeps its float32 variables as they are;
* the input preprocessing of the training pipeline (:class:`Preprocessing`: raw ``uint8``
  → ``x / 255`` → mean/std, ``[0, 1]`` or ``[−1, 1]``) is recorded and applied:
  ``model(images)`` takes raw integer images, ``model.forward(inputs)`` inputs already
  preprocessed, and anything else is an error, never a silently wrong answer.

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

The file is ONE ``.npz`` (format in docs/export.md): arrays under ``variables/…``,
``layers/…``, ``thresholds/…`` and ``preprocessing/table`` plus a JSON ``meta`` entry
(format name and version, the model's registry name and config, its quantizers' declared
forwards, preprocessing, input shape, layer order, the chain's steps, per-layer facts).
:func:`load` rebuilds the module from ``binax.models``' registry (never importing anything
the file names; :mod:`binax.export.packed_file`), needs neither ``binax.train`` nor latent
weights;
:meth:`PackedModel.save_portable` writes the same inference as a serialized
``jax.export`` (StableHLO) that runs with ``jax`` alone.
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
from jax import lax

import binax
from binax import layers, models
from binax.errors import ConfigError, PackedFileError
from binax.export import chain as chain_lib
from binax.export import file_arrays, packed_file
from binax.export.identity import _build_module, _jsonable, module_identity
from binax.export.inference import (
    LayerExport,
    PackedLayer,
    derived_arrays,
    export_layer,
    exported,
    kernel_request,
    quantize_kernels,
)
from binax.export.preprocessing import Preprocessing, as_preprocessing
from binax.packed.kernels import CPU_COMPILER_OPTIONS
from binax.transforms import inference_model

Array = jax.Array

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PORTABLE_REQUIREMENTS",
    "RUNTIMES",
    "PackedModel",
    "export",
    "load",
    "save",
    "read_meta",
]

FORMAT = packed_file.FORMAT
FORMAT_VERSION = packed_file.FORMAT_VERSION
RUNTIMES = ("auto", "chain", "generic")
#: What running a :meth:`PackedModel.save_portable` artifact needs: jax and the packages
#: jax itself requires, and flatbuffers, which ``jax.export.deserialize`` imports but jax
#: does not install (tests/test_export_file.py runs an artifact with exactly these).
PORTABLE_REQUIREMENTS = ("jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum", "scipy", "flatbuffers")


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
        raise ConfigError(f"variables must be a dict with 'params' (and 'batch_stats'); got {type(variables).__name__}.")
    want = {p: tuple(v.shape) for p, v in _flatten(unfreeze(abstract)).items()}
    have = {p: tuple(np.shape(v)) for p, v in _flatten(unfreeze(dict(variables))).items()}
    missing = sorted("/".join(p) for p in set(want) - set(have))
    if missing:
        raise ConfigError(f"variables lack {len(missing)} entries the model needs, e.g. {missing[:3]}.")
    wrong = sorted("/".join(p) + f" {have[p]} != {want[p]}" for p in want if have[p] != want[p])
    if wrong:
        raise ConfigError(f"variables have the wrong shape for this model and input shape: {wrong[:3]}.")


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
    """A packed inference model.

    * ``model(images) -> logits``: raw images, integers in ``[0, max_value]`` (``uint8``)
      of shape ``(N, *input_shape)``, preprocessed as in training
      (:attr:`preprocessing`); a model exported with ``preprocessing=None`` takes float
      inputs here instead;
    * ``model.forward(inputs) -> logits``: inputs already preprocessed (float32, what the
      training pipeline fed the model), checked against the range the preprocessing gives;
    * ``model.preprocess(images)``: the float32 inputs of raw images;
    * ``model.report()``, ``model.save(path)``, ``model.save_portable(path)``.

    Build one with :func:`export` or :func:`load`.
    """

    def __init__(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, _traced=None):
        self.meta = json.loads(json.dumps(meta))  # a plain copy
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.name = self.meta["model"] or self.meta["model_class"]
        self.config = self.meta["config"]
        self.input_shape = tuple(self.meta["input_shape"])
        self.runtime = self.meta["runtime"]
        self.preprocessing = Preprocessing.from_json(self.meta["preprocessing"])
        if _traced is None:  # (model, calls) when export() has them already
            model = inference_model(_build_module(self.meta))
            _traced = (model, trace(model, self.input_shape)[0])
        self.model, calls = _traced
        self._calls = calls
        self.layers: dict[tuple, PackedLayer] = {}
        for key, entry in self.meta["layers"].items():
            path = tuple(key.split("/"))
            self.layers[path] = PackedLayer(path, calls[path].module, entry["kind"], entry["info"])
        self._plan = self._make_plan() if self.runtime == "chain" else None
        self._host_arrays = self._runtime_arrays()
        self._device_arrays = jax.device_put(self._host_arrays)
        opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
        self._forward = jax.jit(self._run, compiler_options=opts)
        self._forward_raw = jax.jit(self._run_raw, compiler_options=opts)

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
        out = {
            "layers": layers,
            "thresholds": self._group("thresholds"),
            "variables": _unflatten(variables),
        }
        if "preprocessing/table" in self._arrays:
            out["table"] = self._arrays["preprocessing/table"]
        return out

    # ---- inference

    def _run(self, arrays, inputs):
        """Logits of float model inputs ``(N, *input_shape)``."""
        float_vars = arrays["variables"]
        if self._plan is not None:
            return chain_lib.chain_forward(self._plan, arrays, float_vars, inputs)
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
            return self.model.apply(float_vars, inputs, train=False, progress=1.0)

    @staticmethod
    def _lookup(table, images):
        """``table[c, v]`` per channel ``c`` of raw values ``v``; NaN for ``v`` past the table."""
        channels = jnp.arange(table.shape[0]).reshape((1,) * (images.ndim - 1) + (-1,))
        return jnp.asarray(table).at[channels, images.astype(jnp.int32)].get(mode="fill", fill_value=jnp.nan)

    def _run_raw(self, arrays, images):
        """Logits of raw integer images: the preprocessing table, then :meth:`_run`; NaN
        logits for an image with a value past the table (a sign would turn a NaN input
        into a valid bit)."""
        table = arrays["table"]
        logits = self._run(arrays, self._lookup(table, images))
        valid = jnp.all(images.astype(jnp.int32) < table.shape[1], axis=tuple(range(1, images.ndim)))
        return jnp.where(valid.reshape((-1,) + (1,) * (logits.ndim - 1)), logits, jnp.nan)

    def _check_shape(self, x, what: str) -> None:
        if np.ndim(x) != len(self.input_shape) + 1 or tuple(np.shape(x)[1:]) != self.input_shape:
            raise ConfigError(
                f"{self.name} was exported for {what} of shape (N, {', '.join(map(str, self.input_shape))}); "
                f"got {tuple(np.shape(x))}."
            )

    def _raw_images(self, images):
        """``images`` checked as raw pixels (integers in range, the exported shape), as uint8."""
        pre = self.preprocessing
        images = _as_array(images)
        dtype = np.dtype(images.dtype)
        if not np.issubdtype(dtype, np.integer):
            raise ConfigError(
                f"{self.name} takes raw images: integers in [0, {pre.max_value}] (uint8), which it preprocesses "
                f"as in training ({pre.describe()}); got {dtype} values. Pass the raw pixels, or call "
                f".forward(inputs) with inputs already preprocessed this way."
            )
        self._check_shape(images, "raw images")
        if np.size(images):
            lo, hi = int(np.min(images)), int(np.max(images))  # on the host: no int32 wrap-around
            if lo < 0 or hi > pre.max_value:
                raise ConfigError(
                    f"raw pixel values must lie in [0, {pre.max_value}] for {self.name} "
                    f"({pre.dataset or 'its preprocessing'}); got values in [{lo}, {hi}]."
                )
        return images.astype(np.uint8)

    def preprocess(self, images) -> np.ndarray:
        """Float32 model inputs of raw integer ``images``, bit for bit those of the training
        pipeline (:func:`binax.data.normalize`)."""
        if not self.preprocessing.takes_raw:
            raise ConfigError(f"{self.name} was exported without preprocessing (preprocessing=None); it has none to apply.")
        table = self._arrays["preprocessing/table"]
        raw = np.asarray(self._raw_images(images), np.intp)
        return table[np.arange(table.shape[0]), raw]

    def forward(self, inputs) -> Array:
        """Logits of model inputs already preprocessed as in training (float32
        ``(N, *input_shape)``).

        With a recorded preprocessing the inputs are checked: every value must be one the
        preprocessing gives a raw pixel of its channel (within 0.1 % of the step between
        two pixel values; only the range for a dataset whose evaluation images are resized),
        so raw pixels as floats, ``[0, 1]`` floats for a ``'mean_std'`` model and the like
        are an error.
        """
        inputs = _as_array(inputs)
        dtype = np.dtype(inputs.dtype)
        if not np.issubdtype(dtype, np.floating):
            hint = " Raw images go to model(images)." if self.preprocessing.takes_raw else ""
            raise ConfigError(
                f"{self.name}.forward takes float inputs preprocessed as in training "
                f"({self.preprocessing.describe()}); got {dtype} values.{hint}"
            )
        self._check_shape(inputs, "inputs")
        inputs = jnp.asarray(inputs, jnp.float32)
        if self.preprocessing.takes_raw and inputs.size:
            self._check_preprocessed(np.asarray(inputs))
        return self._forward(self._device_arrays, inputs)

    def _check_preprocessed(self, x: np.ndarray) -> None:
        pre = self.preprocessing
        table = self._arrays["preprocessing/table"]  # (C, V), increasing along V
        values = x.reshape(-1, x.shape[-1]).T  # (C, n)
        low, high = table[:, 0], table[:, -1]
        step = np.min(np.diff(table, axis=1), axis=1)
        for c in range(table.shape[0]):
            v = values[c]
            if not np.all(np.isfinite(v)) or v.min() < low[c] - step[c] / 2 or v.max() > high[c] + step[c] / 2:
                raise ConfigError(
                    f"{self.name} was trained on inputs preprocessed as {pre.describe()}, which lie in "
                    f"[{low[c]:.4g}, {high[c]:.4g}] (channel {c}); got values in [{np.min(v):.4g}, {np.max(v):.4g}]. "
                    f"Raw images go to model(images), which preprocesses them."
                )
            if pre.resize is not None:
                continue  # resized images take values between the table's
            i = np.clip(np.searchsorted(table[c], v), 1, table.shape[1] - 1)
            near = np.minimum(np.abs(v - table[c, i - 1]), np.abs(v - table[c, i]))
            bad = np.flatnonzero(near > 1e-3 * step[c])
            if bad.size:
                raise ConfigError(
                    f"{self.name} was trained on inputs preprocessed as {pre.describe()}; the input value "
                    f"{float(v[bad[0]]):.6g} (channel {c}) is not one of the {table.shape[1]} values that "
                    f"preprocessing gives a raw pixel. Raw images go to model(images), which preprocesses them."
                )

    def __call__(self, images) -> Array:
        if not self.preprocessing.takes_raw:
            return self.forward(images)
        return self._forward_raw(self._device_arrays, self._raw_images(images))

    # ---- portable artifact

    def jax_export(self, *, platforms: Sequence[str] | None = None) -> "jax.export.Exported":
        """The packed inference as a ``jax.export.Exported`` (StableHLO) with the arrays
        inside: ``(batch, *input_shape)`` raw ``uint8`` images (float32 inputs for a model
        exported with ``preprocessing=None``) → float32 logits, any batch size.

        Raw values past ``max_value`` give NaN logits for their image (the artifact cannot
        raise). The arrays pass an optimization barrier so that the compiler does not
        fold them as constants: the artifact computes what :meth:`__call__` computes, with
        the same predictions and logits within float rounding (XLA compiles it by itself
        and may order the float stages' sums differently; docs/export.md). ``platforms``:
        ``jax.export``'s (default: this backend).
        """
        arrays = jax.tree.map(np.asarray, self._host_arrays)
        raw = self.preprocessing.takes_raw

        def infer(x):
            a = lax.optimization_barrier(arrays)
            return self._run_raw(a, x) if raw else self._run(a, x)

        batch = jax.export.symbolic_shape("batch")[0]
        spec = jax.ShapeDtypeStruct((batch, *self.input_shape), jnp.uint8 if raw else jnp.float32)
        return jax.export.export(jax.jit(infer), platforms=platforms)(spec)

    def save_portable(self, path: str | os.PathLike, *, platforms: Sequence[str] | None = None) -> int:
        """Writes :meth:`jax_export` serialized to ``path``; returns its size in bytes.

        Written atomically (missing folders created). Run it without binax (``jax`` and
        ``flatbuffers``: :data:`PORTABLE_REQUIREMENTS`):
        ``jax.export.deserialize(open(path, 'rb').read()).call(images)``.
        """
        data = self.jax_export(platforms=platforms).serialize()
        return packed_file.atomic_write(path, lambda f: f.write(data))

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
            desc = layers.describe(call.module)
            cls = desc.kind(call.module)  # the summary's words for the same layer
            if layer is not None:
                rows.append(LayerRow(key, cls, _compute_text(layer), ", ".join(stored.get(key, [])), self.meta["layers"][key].get("note", "")))
            elif self._plan is not None and path in self._plan.blocks:
                if path in self._plan.fused:
                    producer = "/".join(self._plan.fused[path]["producer"])
                    rows.append(LayerRow(key, cls, f"fused: int32 of {producer} >= threshold -> packed bits", ", ".join(stored.get(key, []))))
                else:
                    rows.append(LayerRow(key, cls, "float", "float32 variables", self._plan.not_fused.get(path, "")))
            elif desc.has_macs:
                rows.append(LayerRow(key, cls, "float", "float32 variables"))
        return rows

    def report(self) -> str:
        """A table of what runs packed (XOR-popcount) and what runs in float, layer by layer."""
        rows = self.rows()
        head = ("layer", "type", "compute", "stored", "note")
        table = [head] + [(r.path, r.kind, r.compute, r.stored, r.note) for r in rows]
        widths = [max(len(str(t[i])) for t in table) for i in range(len(head))]
        lines = [
            f"{self.name} packed model (runtime {self.runtime!r}, input {self.input_shape}, "
            f"{self.nbytes:,} bytes of arrays)",
            f"preprocessing: {self.preprocessing.describe()}",
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


def _as_array(x):
    """A JAX or NumPy array as it is; anything else (lists) through NumPy."""
    return x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)


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


def _chain_json(ops, exports: Mapping[tuple, LayerExport], plan: chain_lib.ChainPlan, calls) -> list[dict]:
    """The chain's steps in execution order, as the file records them (docs/export.md)."""
    out = []
    for op in ops:
        step: dict[str, Any] = {"op": op.kind}
        if op.path:
            step["path"] = "/".join(op.path)
        if op.kind == "max_pool":
            step.update(window=list(op.window), strides=list(op.strides), padding=_jsonable(op.padding, "padding"))
        elif op.kind == "activation":
            step["activation"] = op.activation
        elif op.kind == "layer":
            e = exports.get(op.path)
            step.update(type=type(calls[op.path].module).__name__, compute=e.kind if e else "float")
        elif op.kind == "block":
            block = plan.blocks[op.path]
            step.update(fused=op.path in plan.fused, norm=type(block.norm).__name__)
            if isinstance(block.norm, nn.BatchNorm):
                act = "rprelu" if block.act_module is not None else block.activation
                step.update(epsilon=float(block.norm.epsilon), activation=act)
        out.append(step)
    return out


# ------------------------------------------------------------------------- export


def export(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    preprocessing: Preprocessing | str | None,
    input_shape: Sequence[int] | None = None,
    runtime: str = "auto",
    progress: float = 1.0,
) -> PackedModel:
    """Packs a trained model for inference.

    Args:
      model: the Flax module as trained (``binax.models.create(...)``, or the model
        :func:`binax.train.restore_variables` returns for a workdir); its quantizers must
        be registry names (or ``"module:function"``).
      variables: ``{'params': ..., 'batch_stats': ...}`` of the trained model.
      preprocessing: what the training pipeline did to raw images, recorded in the file
        and applied by ``packed(images)``: a :class:`Preprocessing`
        (``Preprocessing.from_config(config)`` for a training config), a dataset name
        (``'fashion_mnist'``: binax.data's default ``'mean_std'`` normalization), or None
        for a model that takes float inputs as given (then ``input_shape`` is required).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``; default: the preprocessing's.
      runtime: ``"auto"`` (the packed chain where the family has a planner, else generic),
        ``"chain"`` or ``"generic"``.
      progress: training progress at which weight quantizers are evaluated (their
        forward does not depend on it for binax's binarizers).

    Returns:
      a :class:`PackedModel`; ``.save(path)`` writes the file, ``.save_portable(path)``
      the ``jax.export`` artifact.

    Raises:
      binax.errors.ConfigError: not a module, unknown runtime, a shape or variables that do
        not fit the model, a config value that cannot be stored.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"export takes the Flax module (binax.models.create(name, **config), or the model "
            f"binax.train.restore_variables(workdir) returns); got {type(model).__name__} {model!r:.60}."
        )
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}; got {runtime!r}.")
    pre = as_preprocessing(preprocessing, input_shape)
    shape = pre.shape
    registry_name, class_name, config, quantizers = module_identity(model)
    model = inference_model(model)
    ops = chain_lib.plan_ops(model)
    if runtime == "chain" and ops is None:
        raise ConfigError(
            f"{registry_name or class_name} has no packed-chain plan (model.chain() is None: residual networks, "
            f"BinaryDuo's replicated channels); use runtime='generic'."
        )
    calls, abstract = trace(model, shape)
    variables = unfreeze(dict(variables)) if isinstance(variables, Mapping) else variables
    _check_variables(variables, abstract)

    use_chain = ops is not None and runtime != "generic"
    map_shapes = chain_lib.map_shapes(ops, calls, shape) if use_chain else {}

    exports: dict[tuple, LayerExport] = {}
    params = variables["params"]
    replaced = {p: c.module for p, c in calls.items() if exported(c.module)}
    requests = {p: kernel_request(m, _subtree(params, p)) for p, m in replaced.items()}
    quantized = quantize_kernels({p: r for p, r in requests.items() if r is not None}, progress)
    for path, module in replaced.items():
        e = export_layer(
            module, _subtree(params, path), progress=progress, map_shape=map_shapes.get(path), quantized=quantized.get(path)
        )
        if e is not None:
            exports[path] = e

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "binax_version": binax.__version__,
        "model": registry_name,
        "model_class": class_name,
        "config": config,
        "quantizers": quantizers,
        "input_shape": list(shape),
        "preprocessing": pre.to_json(),
        "runtime": "chain" if use_chain else "generic",
        "progress": float(progress),
        "layer_order": [{"path": "/".join(p), "type": type(c.module).__name__} for p, c in calls.items()],
        "layers": {"/".join(p): {"kind": e.kind, "info": e.info, "note": e.note} for p, e in exports.items()},
    }
    arrays: dict[str, np.ndarray] = {}
    if pre.takes_raw:
        arrays["preprocessing/table"] = pre.table(shape[-1])
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
        meta["chain"] = _chain_json(ops, exports, plan, calls)

    # The model's variables (what its trace declares), as float32: the runtime computes
    # in float32 whatever the training dtype.
    for col, tree in unfreeze(abstract).items():
        for path in _flatten(tree):
            if any(path[: len(s)] == s for s in skip):
                continue
            leaf = _subtree(variables.get(col, {}), path)
            arrays["variables/" + "/".join((col,) + path)] = np.asarray(leaf, np.float32)
    return PackedModel(meta, arrays, _traced=(model, calls))


# ------------------------------------------------------------------------- file


def save(model: PackedModel, path: str | os.PathLike) -> int:
    """Writes ``model`` as one ``.npz`` (deflate-compressed) at ``path`` exactly (no suffix
    added), atomically (its folder is created if missing); returns its size in bytes."""
    return packed_file.write(path, model.meta, model.arrays())


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a packed model file, checked for the format, its version and the
    fields loading reads (:class:`binax.errors.PackedFileError` otherwise)."""
    return packed_file.check_meta(packed_file.read(path)[0], path)


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> PackedModel:
    """Reads a packed model file written by :func:`save` / :meth:`PackedModel.save`, as data.

    The model is rebuilt from ``binax.models``' registry by the name and config the file
    records, its quantizers from ``binax.binarizers``' registry by name; nothing the file
    names is imported or called (docs/export.md says what loading trusts). A model of a
    class of your own (recorded by class name only) is run on the module you pass as
    ``model``, which must have the file's config.

    Raises:
      binax.errors.PackedFileError: one line naming the file and what is wrong with it (not
        a zip, truncated or damaged, another format version, malformed metadata, a model
        or quantizer that is not registered, a missing array, a wrong dtype or shape,
        non-finite values).
    """
    meta, arrays = packed_file.read(path)
    meta = packed_file.check_meta(meta, path)
    try:
        Preprocessing.from_json(meta["preprocessing"])
    except (ConfigError, TypeError) as e:
        raise PackedFileError(f"{path}: its preprocessing record is not valid: {e}") from None
    if model is None:
        module = _build_module(meta, path)
    else:
        _, cls_name, config, _ = module_identity(model)
        if cls_name != meta["model_class"] or config != meta["config"]:
            diff = sorted(k for k in set(config) | set(meta["config"]) if config.get(k) != meta["config"].get(k))
            raise PackedFileError(
                f"{path}: the model passed ({cls_name}) is not the one exported ({meta['model_class']}); "
                f"config keys that differ: {diff[:5]}."
            )
        module = model
    module = inference_model(module)
    try:
        calls, abstract = trace(module, tuple(meta["input_shape"]))
    except ConfigError as e:
        raise PackedFileError(f"{path}: its model does not take input_shape {meta['input_shape']}: {e}") from None
    if meta["runtime"] == "chain" and chain_lib.plan_ops(module) is None:
        raise PackedFileError(f"{path}: runtime 'chain', but {meta['model'] or meta['model_class']} has no chain plan.")
    want = file_arrays.expected_arrays(meta, calls, unfreeze(abstract), path)
    file_arrays.check_arrays(arrays, want, path)
    return PackedModel(meta, arrays, _traced=(module, calls))
