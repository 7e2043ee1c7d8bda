"""Builds Larq/Keras models from binax's LCE layer lists, converts them with Larq Compute
Engine, and runs them in LCE's interpreter: the TensorFlow side of :mod:`binax.export.lce`.

Run as a script by path (``python .../lce_worker.py JOBS.json``), never imported by binax:
it imports numpy, TensorFlow, larq and LCE but not binax or jax, so

* ``TF_USE_LEGACY_KERAS=1`` is set before TensorFlow is imported, in a process of its own
  (larq 0.14 needs Keras 2, ``tf_keras``; a test worker or a training run that already
  imported TensorFlow with Keras 3 cannot switch);
* it can run under another Python than binax's (``BINAX_LCE_PYTHON``), e.g. one whose
  NumPy is < 2: LCE 0.16's interpreter is compiled against NumPy 1 and reads a NumPy 2
  array as 0 bytes.

The jobs file is data: a closed set of layer types with numbers and array names, read
with ``allow_pickle=False``; nothing in it is imported or called. Each job writes its
``.tflite`` to ``tflite`` (the caller moves it into place atomically) and, when asked,
``outputs`` (an ``.npz`` of the Keras model's and the interpreter's logits on ``inputs``)
and interpreter timings; one JSON line per job goes to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

LAYER_TYPES = (
    "quant_conv", "quant_dense", "conv", "dense", "affine", "batch_norm", "prelu", "max_pool", "flatten", "activation"
)
ACTIVATIONS = ("relu", "hardtanh", "tanh")
EXIT_NUMPY = 3  # the interpreter cannot run under this NumPy


def _keras_layer(tf, lq, spec: dict, arrays):
    """One Keras layer of a binax layer entry (its weights are set after the build)."""
    kind = spec["type"]
    if kind not in LAYER_TYPES:
        raise ValueError(f"unknown layer type {kind!r}; known: {LAYER_TYPES}")
    name = spec["name"]
    if kind in ("quant_conv", "conv"):
        kernel = arrays[spec["kernel"]]
        common = dict(
            filters=kernel.shape[-1],
            kernel_size=kernel.shape[:2],
            strides=tuple(spec["strides"]),
            padding=spec["padding"],
            use_bias="bias" in spec,
            name=name,
        )
        if kind == "conv":
            return tf.keras.layers.Conv2D(**common)
        # ste_sign on both: the pattern LCE's converter turns into LceBconv2d.
        return lq.layers.QuantConv2D(
            **common, input_quantizer="ste_sign", kernel_quantizer="ste_sign", pad_values=float(spec["pad_values"])
        )
    if kind in ("quant_dense", "dense"):
        units = arrays[spec["kernel"]].shape[-1]
        if kind == "dense":
            return tf.keras.layers.Dense(units, use_bias="bias" in spec, name=name)
        if not spec.get("as_conv", True):
            return lq.layers.QuantDense(
                units, use_bias="bias" in spec, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name=name
            )
        # LCE 0.16 turns binary convolutions, not QuantDense, into LceBconv2d: a binary
        # dense layer is a 1×1 QuantConv2D on a 1×1 map (the same accumulator).
        conv = lq.layers.QuantConv2D(
            units, 1, use_bias="bias" in spec, input_quantizer="ste_sign", kernel_quantizer="ste_sign", name=name
        )
        return tf.keras.Sequential(
            [tf.keras.layers.Reshape((1, 1, -1)), conv, tf.keras.layers.Reshape((units,))], name=name + "_as_conv"
        )
    if kind == "affine":
        scale = tf.constant(arrays[spec["scale"]], tf.float32)
        bias = tf.constant(arrays[spec["bias"]], tf.float32)
        return tf.keras.layers.Lambda(lambda x: x * scale + bias, name=name)
    if kind == "batch_norm":
        return tf.keras.layers.BatchNormalization(epsilon=float(spec["epsilon"]), name=name)
    if kind == "prelu":
        # One slope per channel, shared over the spatial axes of a feature map.
        return tf.keras.layers.PReLU(shared_axes=spec.get("shared_axes"), name=name)
    if kind == "max_pool":
        return tf.keras.layers.MaxPool2D(tuple(spec["pool"]), tuple(spec["strides"]), spec["padding"], name=name)
    if kind == "flatten":
        return tf.keras.layers.Flatten(name=name)
    act = spec["activation"]
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {ACTIVATIONS}")
    if act == "hardtanh":
        return tf.keras.layers.Lambda(lambda x: tf.clip_by_value(x, -1.0, 1.0), name=name)
    return tf.keras.layers.Activation(act, name=name)


def _weights(spec: dict, arrays) -> list[np.ndarray] | None:
    kind = spec["type"]
    if kind == "quant_dense" and spec.get("as_conv", True):  # the 1×1 convolution's kernel
        kernel = arrays[spec["kernel"]]
        return [kernel.reshape(1, 1, *kernel.shape)] + ([arrays[spec["bias"]]] if "bias" in spec else [])
    if kind in ("quant_conv", "conv", "dense", "quant_dense"):
        return [arrays[spec["kernel"]]] + ([arrays[spec["bias"]]] if "bias" in spec else [])
    if kind == "batch_norm":
        return [arrays[spec[k]] for k in ("gamma", "beta", "mean", "var")]
    if kind == "prelu":
        return [arrays[spec["alpha"]]]
    return None


def build_model(tf, lq, job: dict, arrays):
    """The Keras model of one job: ``Input(input_shape, batch)`` then its layers."""
    x = inputs = tf.keras.Input(tuple(job["input_shape"]), batch_size=int(job["batch"]), name="inputs")
    built = []
    for spec in job["layers"]:
        layer = _keras_layer(tf, lq, spec, arrays)
        x = layer(x)
        built.append((layer, spec))
    model = tf.keras.Model(inputs, x, name=job["name"])
    for layer, spec in built:
        w = _weights(spec, arrays)
        if w is not None:
            layer.set_weights([np.asarray(a, np.float32) for a in w])
    return model


def interpreter_ready() -> str | None:
    """Why LCE's interpreter cannot run in this process (None: it can)."""
    if int(np.__version__.split(".")[0]) >= 2:
        return (
            f"LCE's Python interpreter (larq-compute-engine 0.16) is built against NumPy 1 and reads "
            f"NumPy {np.__version__} arrays as 0 bytes; run the check with BINAX_LCE_PYTHON set to a Python "
            f"whose numpy is < 2 (docs/export.md)"
        )
    return None


def predict(interpreter, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of ``x`` through a ``batch``-sized interpreter (the last chunk padded)."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        out.append(interpreter.interpreter.predict([np.ascontiguousarray(chunk, np.float32)])[0][:n])
    return np.concatenate(out)


def time_interpreter(interpreter, shape, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this process, all threads) seconds per ``predict`` call on one random
    batch, ``repeats`` times after ``warmup``."""
    x = [np.random.default_rng(0).standard_normal(shape).astype(np.float32)]
    for _ in range(warmup):
        interpreter.interpreter.predict(x)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        interpreter.interpreter.predict(x)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return wall, cpu


def run_job(tf, lq, lce, Interpreter, job: dict) -> dict:
    with np.load(job["arrays"], allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    model = build_model(tf, lq, job, arrays)
    flatbuffer = lce.convert_keras_model(model)
    with open(job["tflite"], "wb") as f:
        f.write(flatbuffer)
    result = {"name": job["name"], "tflite_bytes": len(flatbuffer)}
    if job.get("inputs") or job.get("timing"):
        why = interpreter_ready()
        if why is not None:
            print(why, file=sys.stderr)
            sys.exit(EXIT_NUMPY)
        interpreter = Interpreter(flatbuffer, num_threads=int(job.get("threads", 1)))
    if job.get("inputs"):
        x = np.load(job["inputs"], allow_pickle=False)
        n = int(job.get("keras_count") or len(x))  # the Keras model on the first n inputs
        keras = np.concatenate([model(x[i : min(i + 256, n)], training=False).numpy() for i in range(0, n, 256)])
        np.savez(job["outputs"], keras=keras, lce=predict(interpreter, x, int(job["batch"])))
    if job.get("timing"):
        t = job["timing"]
        shape = (int(job["batch"]), *job["input_shape"])
        result["seconds"], result["cpu_seconds"] = time_interpreter(
            interpreter, shape, int(t["repeats"]), int(t.get("warmup", 2))
        )
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: lce_worker.py JOBS.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        jobs = json.load(f)["jobs"]
    # Keras 2 (tf_keras) for larq, decided before TensorFlow is imported. jax is kept out:
    # TensorFlow's converter imports it if it can, and this process may run a NumPy that
    # binax's jax does not accept.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.modules.setdefault("jax", None)
    import larq as lq
    import larq_compute_engine as lce
    import tensorflow as tf
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    for job in jobs:
        print(json.dumps(run_job(tf, lq, lce, Interpreter, job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
