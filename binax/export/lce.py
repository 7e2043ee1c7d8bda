"""Export to Larq Compute Engine: a packed model as a Larq/Keras model and an LCE ``.tflite``.

LCE (Bannink et al. 2021, https://github.com/larq/compute-engine) runs binary
convolutions on phones and boards (ARM NEON kernels). Its converter recognises Larq's
``QuantConv2D`` with ``ste_sign`` input and kernel quantizers (``pad_values=1`` for
``"same"`` padding) and turns them into its binary ops, fusing a following per-channel
multiply/add and the next layer's sign into the binary convolution's output.

The layers come from the packed model's chain (:mod:`binax.export.chain`), i.e. binax's
deployed form, so the ``.tflite`` computes what the packed runtime computes:

* a binary layer (sign activations × sign kernel) is a ``QuantConv2D`` with the ±1 kernel
  (unpacked from the file's bits) and no bias, a dense one a 1×1 ``QuantConv2D`` on a 1×1
  map (LCE 0.16 converts binary convolutions, not ``QuantDense``): its output is binax's
  integer accumulator, exactly;
* a fused ``[max-pool →] BatchNorm → activation → sign`` block (one integer threshold
  ``t`` and a ``flip`` per channel) is a per-channel affine ``s·(acc − t + ½)``, ``s = ±1``:
  its sign is the chain's bit ``(acc >= t) XOR flip``, and every value is a half-integer
  far from 0, so no rounding can move it (the layer's scale ``α`` and bias live in ``t``);
* a binary layer whose output is decoded (it feeds a float BatchNorm) is followed by the
  affine ``acc·scale + bias`` binax decodes with (``scale = α``: XNOR's ``mean|W|``,
  Libra-PB's power of two, 1 for ``ste_sign``);
* float layers (first and last), BatchNorms that feed them, max-pools, flatten and the
  activations ``relu``/``hardtanh``/``tanh`` map one to one (float, as in binax).

Anything else is refused with one line naming the layer: models without a chain
(residual networks, BinaryDuo's replicated channels), multi-level or ``{0, 1}``
activations (LCE's binary layers take ±1), kernels that are not ±α per channel, ABC-Net's
bases, RPReLU, padding other than +1 around binary inputs.

TensorFlow never enters binax's process: the Keras side is a script run in a subprocess
(``lce_worker.py``, ``BINAX_LCE_PYTHON`` or this Python), which sets
``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported. The ``.tflite`` takes the float
inputs ``packed.forward`` takes (``packed.preprocess(raw_images)``), batch ``batch_size``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from binax import files, layers
from binax.errors import ConfigError, MissingDependencyError
from binax.export.runtime import PackedModel
from binax.packed.bits import unpack_bits

__all__ = ["keras_layers", "export_tflite", "run_lce", "lce_python", "WORKER"]

#: The TensorFlow-side script (run by path, never imported by binax).
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lce_worker.py")
_EXIT_NUMPY = 3  # lce_worker.EXIT_NUMPY
_INSTALL = "pip install 'binax[lce]'"


def _refuse(path: Sequence[str] | str, why: str) -> ConfigError:
    where = path if isinstance(path, str) else "/".join(path)
    return ConfigError(f"cannot export to LCE: {where}: {why}.")


# ------------------------------------------------------------------------- layers


def _padding(path, g: layers.Geometry, float_input: bool) -> str:
    """Keras padding of a conv; binary inputs must pad with +1 (LCE's ``pad_values=1``)."""
    pad = g.padding
    if not isinstance(pad, str) or pad.upper() not in ("SAME", "VALID"):
        raise _refuse(path, f"padding {pad!r} (LCE export maps 'SAME' and 'VALID')")
    if pad.upper() == "SAME":
        want = 0.0 if float_input else 1.0
        if g.pad_value != want:
            kind = "a float" if float_input else "a binary"
            raise _refuse(path, f"pads {kind} input with {g.pad_value} (Keras/LCE pad it with {want})")
    return pad.lower()


def max_pool_fields(op) -> dict:
    """Keras ``MaxPool2D`` arguments of a chain's max-pool step ('SAME'/'VALID' padding)."""
    pad = op.padding
    if not isinstance(pad, str) or pad.upper() not in ("SAME", "VALID"):
        raise _refuse("max_pool", f"padding {pad!r} (LCE export maps 'SAME' and 'VALID')")
    return {"pool": list(op.window), "strides": list(op.strides), "padding": pad.lower()}


def _conv(path, module) -> layers.Geometry:
    """A 2-d, undilated, ungrouped convolution's geometry (its layer descriptor's)."""
    g = layers.describe(module).geometry(module)
    if len(g.window) != 2:
        raise _refuse(path, f"{len(g.window)}-d convolution (LCE export maps 2-d)")
    if max(g.ntuple("dilation")) != 1 or g.groups != 1:
        raise _refuse(path, "dilated or grouped convolution")
    return g


def _unpack(arrays: Mapping, info: Mapping) -> np.ndarray:
    """The ±1 float kernel of a packed layer, in the model's own kernel layout."""
    axis = info["pack_axis"]
    n = info["in_channels"] if "in_channels" in info else info["shape"][axis]
    kernel = np.asarray(unpack_bits(jnp.asarray(arrays["bits"]), int(n), axis=axis, dtype=jnp.float32))
    if info.get("layout") == "map":
        kernel = kernel.reshape(-1, kernel.shape[-1])
    return kernel


class _Builder:
    """Collects layer entries and their arrays (the worker's job file)."""

    def __init__(self):
        self.layers: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, kind: str, path, arrays: Mapping[str, Any] | None = None, **fields) -> None:
        i = len(self.layers)
        entry = {"type": kind, "name": f"l{i}_{kind}_{'_'.join(path) if path else ''}".rstrip("_"), **fields}
        for key, value in (arrays or {}).items():
            if value is None:
                continue
            name = f"{i}/{key}"
            self.arrays[name] = np.asarray(value, np.float32)
            entry[key] = name
        self.layers.append(entry)


def _float_layer(b: _Builder, path, module, params: Mapping, kernel=None) -> None:
    kernel = np.asarray(params["kernel"] if kernel is None else kernel, np.float32)
    bias = params.get("bias")
    if layers.describe(module).product == "conv" and kernel.ndim == 4:
        g = _conv(path, module)
        padding = _padding(path, g, float_input=True)
        b.add("conv", path, {"kernel": kernel, "bias": bias}, strides=list(g.ntuple("strides")), padding=padding)
    elif kernel.ndim == 2:
        b.add("dense", path, {"kernel": kernel, "bias": bias})
    else:
        raise _refuse(path, f"{type(module).__name__} with a {kernel.ndim}-d kernel")


def _binary_layer(b: _Builder, path, layer, arrays: Mapping) -> bool:
    """A packed ``xnor`` layer as a Larq layer (+ its decode affine); True if it stays integer."""
    code = layer.code
    if not code.is_sign:
        raise _refuse(
            path,
            f"input quantizer {code.quantizer!r} takes {code.planes + 1} levels from {code.low:g} "
            f"(LCE's binary layers take sign activations, ±1)",
        )
    info, module = layer.info, layer.module
    kernel = _unpack(arrays, info)
    product = layers.describe(module).product
    if product == "conv":
        g = _conv(path, module)
        padding = _padding(path, g, float_input=False)
        b.add("quant_conv", path, {"kernel": kernel}, strides=list(g.ntuple("strides")), padding=padding, pad_values=1.0)
    elif product == "dense":
        # After a flatten, LCE 0.16's binary convolution on the reshaped bitpacked map gave
        # wrong accumulators for some images: there the layer stays a QuantDense (LCE runs
        # it as a float matmul of ±1 values, exact).
        b.add("quant_dense", path, {"kernel": kernel}, as_conv=info.get("layout") != "map")
    else:
        raise _refuse(path, f"{type(module).__name__} (depthwise binary convolutions are not mapped)")
    if info.get("scale_in_thresholds"):
        return True
    scale = np.asarray(arrays["scale"], np.float32)
    bias = arrays.get("bias")
    b.add("affine", path + ("decode",), {"scale": scale, "bias": np.zeros_like(scale) if bias is None else bias})
    return False


def _binary_bn_affine(params: Mapping) -> dict[str, np.ndarray]:
    """A BinaryBatchNorm on a float input (``s`` where ``x >= τ``, else ``−s``) as ``y = s·x + b``
    whose sign is that output: ``x − τ`` for ``s = +1``; ``τ⁻ − x`` for ``s = −1``, with ``τ⁻``
    the float below ``τ`` (so ``x = τ`` gives −1, as BinaryBatchNorm does). The sign of a
    float difference is exact, so no rounding moves a bit."""
    tau = np.asarray(params["threshold"], np.float32)
    s = np.where(np.asarray(params["sign"]) < 0, -1.0, 1.0).astype(np.float32)
    tau = np.where(s < 0, np.nextafter(tau, np.float32(-np.inf)), tau).astype(np.float32)
    return {"scale": s, "bias": (-s * tau).astype(np.float32)}


def _activation(b: _Builder, path, name: str, rprelu: Mapping | None = None, rank: int = 2) -> None:
    if name in (None, "none"):
        return
    if name != "rprelu":
        b.add("activation", path, activation=name)
        return
    # ReActNet's RPReLU: shift, PReLU (slope per channel), shift (binax.layers.RPReLU).
    ones = np.ones_like(np.asarray(rprelu["slope"], np.float32))
    b.add("affine", path + ("shift_in",), {"scale": ones, "bias": rprelu["shift_in"]})
    slope = np.asarray(rprelu["slope"], np.float32).reshape((1,) * (rank - 2) + (-1,))
    b.add("prelu", path, {"alpha": slope}, shared_axes=list(range(1, rank - 1)) or None)
    b.add("affine", path + ("shift_out",), {"scale": ones, "bias": rprelu["shift_out"]})


def keras_layers(packed: PackedModel) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The LCE worker's layer list and arrays for ``packed`` (see the module docstring).

    Raises:
      binax.errors.ConfigError: one line naming the first layer that does not map, and why.
    """
    plan = packed._plan
    if plan is None:
        raise ConfigError(
            f"cannot export to LCE: {packed.name} runs on the generic runtime (residual shortcuts, or "
            f"BinaryDuo's replicated channels); LCE export maps sequential chains (bnn_mlp, cnn_small, "
            f"vgg_small, vgg7_tiny, alexnet with replicate=1)."
        )
    host = packed._host_arrays
    float_vars = host["variables"]
    b = _Builder()
    rank = 1 + len(packed.input_shape)  # of the values between layers (PReLU's shared axes)
    for op in plan.ops:
        path = op.path
        if op.kind == "flatten":
            b.add("flatten", ("flatten",))
            rank = 2
        elif op.kind == "max_pool":
            b.add("max_pool", ("pool",), **max_pool_fields(op))
        elif op.kind == "activation":
            params = float_vars["params"]
            _activation(b, path, op.activation, _node(params, path) if op.activation == "rprelu" else None, rank)
        elif op.kind == "layer":
            layer = plan.layers.get(path)
            if layer is None:
                params = _node(float_vars.get("params", {}), path)
                _float_layer(b, path, plan.modules.get(path) or packed._calls[path].module, params)
            elif layer.kind == "xnor":
                _binary_layer(b, path, layer, host["layers"][path])
            elif layer.kind == "float_input":
                la = host["layers"][path]
                if layer.descriptor.export == "abc":
                    raise _refuse(path, "ABC-Net layer (M bases x N shifted activations; LCE has one binary conv per layer)")
                kernel = _unpack(la, layer.info) * np.asarray(la["alpha"], np.float32)
                _float_layer(b, path, layer.module, {"bias": la.get("bias")}, kernel)
            elif layer.kind == "abc":
                raise _refuse(path, "ABC-Net layer (M bases x N shifted activations; LCE has one binary conv per layer)")
            else:
                raise _refuse(path, f"{packed.meta['layers']['/'.join(path)].get('note') or 'float kernel'} (not sign weights x per-channel scale)")
        elif op.kind == "block":
            if path in plan.fused:
                th = host["thresholds"][path]
                t, flip = np.asarray(th["threshold"]), np.asarray(th["flip"])
                # One plane: the consumer's code is sign (a multi-plane consumer is refused
                # first, as the layers before it are mapped before its block).
                assert t.shape[0] == 1, t.shape
                s = np.where(flip[0], -1.0, 1.0).astype(np.float32)
                # s·(acc − t + ½): the sign of it is (acc >= t) XOR flip for integer acc.
                bias = (s * (0.5 - t[0].astype(np.float64))).astype(np.float32)
                b.add("affine", path, {"scale": s, "bias": bias})
                continue
            block = plan.blocks[path]
            if layers.describe(block.norm).binary_output:
                b.add("affine", path, _binary_bn_affine(_node(float_vars["params"], path)))
                continue
            v = {col: _node(tree, path) for col, tree in float_vars.items()}
            mean, var = v["batch_stats"]["mean"], v["batch_stats"]["var"]
            params = v.get("params") or {}
            gamma, beta = params.get("scale", np.ones_like(mean)), params.get("bias", np.zeros_like(mean))
            b.add(
                "batch_norm", path, {"gamma": gamma, "beta": beta, "mean": mean, "var": var}, epsilon=float(block.norm.epsilon)
            )
            act = "rprelu" if block.act_module is not None else block.activation
            params = float_vars["params"]
            _activation(b, block.act_path, act, _node(params, block.act_path) if act == "rprelu" else None, rank)
        else:
            raise _refuse(path or op.kind, f"chain step {op.kind!r}")
    return b.layers, b.arrays


def _node(tree: Mapping, path: Sequence[str]) -> Mapping:
    for k in path:
        tree = tree[k]
    return tree


# ------------------------------------------------------------------------- the worker


def lce_python() -> str:
    """The Python that runs the worker: ``$BINAX_LCE_PYTHON``, else this one."""
    return os.environ.get("BINAX_LCE_PYTHON") or sys.executable


def run_lce(
    models: Mapping[str, PackedModel],
    workdir: str,
    *,
    batch_size: int = 1,
    inputs: Mapping[str, np.ndarray] | None = None,
    timing: Mapping[str, Any] | None = None,
    threads: int = 1,
    keras_count: int | None = None,
) -> dict[str, dict]:
    """Converts several packed models in ONE worker process (TensorFlow starts once).

    Writes ``workdir/<name>.tflite`` for each; with ``inputs[name]`` (preprocessed float
    inputs) also returns the Keras model's and LCE's interpreter's logits
    (``result['keras']``, ``result['lce']``; Keras on the first ``keras_count`` only when
    given); with ``timing={'repeats': r, 'warmup': w}``
    the interpreter's wall and CPU seconds per batch (``result['seconds']``,
    ``result['cpu_seconds']``).

    Raises:
      binax.errors.ConfigError: a model that does not map (:func:`keras_layers`).
      binax.errors.MissingDependencyError: larq / LCE / TensorFlow missing, or an
        interpreter check under NumPy >= 2.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    python = lce_python()
    if python == sys.executable and importlib.util.find_spec("larq_compute_engine") is None:
        raise MissingDependencyError(f"LCE export needs larq-compute-engine, larq and tf-keras: {_INSTALL}.")
    jobs = []
    for name, packed in models.items():
        layers, arrays = keras_layers(packed)
        apath = os.path.join(workdir, f"{name}.arrays.npz")
        np.savez(apath, **arrays)
        job = {
            "name": name,
            "input_shape": list(packed.input_shape),
            "batch": batch_size,
            "layers": layers,
            "arrays": apath,
            "tflite": os.path.join(workdir, f"{name}.tflite"),
            "threads": int(threads),
        }
        if inputs is not None and name in inputs:
            ipath = os.path.join(workdir, f"{name}.inputs.npy")
            np.save(ipath, np.asarray(inputs[name], np.float32))
            job.update(inputs=ipath, outputs=os.path.join(workdir, f"{name}.outputs.npz"), keras_count=keras_count)
        if timing:
            job["timing"] = dict(timing)
        jobs.append(job)
    jobs_path = os.path.join(workdir, "jobs.json")
    with open(jobs_path, "w") as f:
        json.dump({"jobs": jobs}, f)
    proc = subprocess.run([python, WORKER, jobs_path], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no message)"]
        if proc.returncode == _EXIT_NUMPY:
            raise MissingDependencyError(tail[0])
        if "ModuleNotFoundError" in tail[0] or "ImportError" in tail[0]:
            raise MissingDependencyError(f"the LCE worker ({python}) cannot import: {tail[0]}; {_INSTALL}.")
        raise RuntimeError(f"LCE worker failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = r
    for job in jobs:
        r = results[job["name"]]
        r["tflite"] = job["tflite"]
        if "outputs" in job:
            with np.load(job["outputs"], allow_pickle=False) as data:
                r.update(keras=data["keras"], lce=data["lce"])
    return results


def export_tflite(packed: PackedModel, path: str | os.PathLike, *, batch_size: int = 1) -> int:
    """Writes ``packed`` as an LCE ``.tflite`` to ``path`` (atomically); returns its size in bytes.

    The file takes float32 inputs ``(batch_size, *packed.input_shape)``, preprocessed as
    ``packed.preprocess(raw_images)`` does, and gives the logits.
    """
    path = os.fspath(path)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_lce({"model": packed}, tmp, batch_size=batch_size)["model"]
        with open(result["tflite"], "rb") as f:
            data = f.read()
    files.write_with(path, lambda f: f.write(data))
    return len(data)
