"""Larq (tf-keras 2) worker for ``benchmarks/vs_peers.py``; runs in ``.venv-larq``.

The same networks as binax's ``vgg_small`` / ``bnn_mlp`` / ``resnet18`` with ``ste_sign`` on inputs and
kernels (see ``vs_peers.py``): a float first layer, ``QuantConv2D``/``QuantDense`` with
``pad_values=1``, no biases, pooling before batch norm (momentum 0.9, epsilon 1e-5), a float
classifier with a bias; Adam(1e-3) on softmax cross-entropy, one ``train_on_batch`` per step
(what ``fit`` runs). ``--xla`` compiles the step with XLA (``jit_compile=True``).

Usage: ``python larq_worker.py --batch 128 --models vgg_small,bnn_mlp [--xla]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Larq needs Keras 2 (tf-keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import larq as lq  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

# Run as a script by vs_peers in its own venv: this directory is sys.path[0].
from _worker import serve, worker_parser  # noqa: E402

QUANT = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", use_bias=False)


def _bn():
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)


def vgg_small(widths=(128, 128, 256, 256, 512, 512), pool_after=(2, 4, 6)) -> keras.Model:
    inp = keras.Input((32, 32, 3))
    x = inp
    for i, width in enumerate(widths):
        if i == 0:
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        else:
            x = lq.layers.QuantConv2D(width, 3, padding="same", pad_values=1.0, **QUANT)(x)
        if i + 1 in pool_after:
            x = keras.layers.MaxPool2D(2)(x)
        x = _bn()(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def bnn_mlp(widths=(2048, 2048, 2048)) -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inp)
    for i, width in enumerate(widths):
        if i == 0:
            x = keras.layers.Dense(width, use_bias=False)(x)
        else:
            x = lq.layers.QuantDense(width, **QUANT)(x)
        x = _bn()(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def _unit(x, width: int, strides: int):
    """binax's residual unit: sign -> binary 3x3 conv (padded with +1) -> BN -> + shortcut."""
    y = lq.layers.QuantConv2D(width, 3, strides=strides, padding="same", pad_values=1.0, **QUANT)(x)
    y = _bn()(y)
    shortcut = x
    if strides != 1 or x.shape[-1] != width:
        # Bi-Real's downsampling: 2x2 average pool -> float 1x1 conv -> BN.
        if strides != 1:
            shortcut = keras.layers.AveragePooling2D(strides, strides, padding="same")(shortcut)
        shortcut = _bn()(keras.layers.Conv2D(width, 1, use_bias=False)(shortcut))
    return keras.layers.Add()([y, shortcut])


def resnet18(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=1000) -> keras.Model:
    """binax's ``resnet18`` with ste_sign (vs_peers.py): float 7x7/2 stem -> BN -> 3x3/2
    max-pool, 16 residual units, global average pool, float dense with a bias."""
    inp = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(widths[0], 7, strides=2, padding="same", use_bias=False)(inp)
    x = keras.layers.MaxPool2D(3, 2, padding="same")(_bn()(x))
    for s, (n, width) in enumerate(zip(blocks, widths)):
        for u in range(2 * n):
            x = _unit(x, width, 2 if (s > 0 and u == 0) else 1)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(classes)(x))


NETWORKS = {
    "vgg_small": (vgg_small, (32, 32, 3), 10),
    "bnn_mlp": (bnn_mlp, (28, 28, 1), 10),
    "resnet18": (resnet18, (224, 224, 3), 1000),
}


def make_step(name: str, batch: int, xla: bool):
    model, shape, classes = NETWORKS[name]
    net = model()
    net.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
    )
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, *shape), dtype=np.float32))
    y = tf.constant(rng.integers(0, classes, batch))

    def step():
        net.train_on_batch(x, y)  # returns the loss as a NumPy value: the step has finished

    return step


def main():
    p = worker_parser()
    p.add_argument("--xla", action="store_true")
    a = p.parse_args()
    steps = {m: make_step(m, a.batch, a.xla) for m in a.models.split(",")}
    serve(steps, {"framework": "larq", "larq": lq.__version__, "tensorflow": tf.__version__, "xla": a.xla})


if __name__ == "__main__":
    main()
