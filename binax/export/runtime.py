"""A packed model at run time (:class:`PackedModel`): its arrays on the device, the chain or
generic runtime, raw-image and preprocessed-input checks, and the portable ``jax.export``
artifact. :mod:`binax.export.model` builds one (``export``, ``load``); the module
docstring there says what the runtimes do.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from binax import models
from binax.errors import ConfigError
from binax.export import chain as chain_lib
from binax.export import packed_file
from binax.export import report as report_lib
from binax.export.identity import _build_module
from binax.export.inference import LayerExport, PackedLayer, derived_arrays
from binax.export.preprocessing import Preprocessing
from binax.packed.kernels import CPU_COMPILER_OPTIONS
from binax.transforms import inference_model

Array = jax.Array

__all__ = ["PackedModel", "trace"]


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
            "variables": traverse_util.unflatten_dict(variables),
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

    def rows(self) -> list[report_lib.LayerRow]:
        """Per-layer facts: every quantized layer, and for the chain every BatchNorm block."""
        return report_lib.rows(self)

    def report(self) -> str:
        """A table of what runs packed (XOR-popcount) and what runs in float, layer by layer."""
        return report_lib.report(self)

    def save(self, path: str | os.PathLike) -> int:
        """Writes the model to ``path`` (one ``.npz``, deflate-compressed, atomically; its
        folder is created if missing); returns the file size in bytes."""
        return packed_file.write(path, self.meta, self.arrays())


def _as_array(x):
    """A JAX or NumPy array as it is; anything else (lists) through NumPy."""
    return x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)

