"""The numpy reader of docs/export.md: its float32 products against the int32 ones it replaced.

Exports the default config's network (``configs/default.py``: IR-Net ``bnn_mlp``
784-1024³-10, random weights; the reader's time does not depend on their values), then
times, in one run, the reader exactly as docs/export.md has it on the 10,000
Fashion-MNIST test images, and the same reader with its binary products in int32 (what
the page had before: numpy has no BLAS for integers) on ``--int32-images`` of them,
scaled per image. Reports how many predictions differ from binax's packed runtime.

Every line of output is one JSON object.

Usage: ``python -m benchmarks.numpy_reader [--images 10000] [--int32-images 1000] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(**record):
    print(json.dumps(record), flush=True)


def doc_reader(int32: bool = False) -> dict:
    """The namespace of docs/export.md's reader; ``int32``: its products in int32 instead."""
    with open(os.path.join(ROOT, "docs", "export.md")) as f:
        (block,) = [b for b in re.findall(r"```python\n(.*?)```", f.read(), re.S) if "def predict(" in b]
    if int32:  # the +-1 signs and unpacked kernels as int32: integer products, no BLAS
        signs = (".astype(np.float32) - 1", "1, -1).astype(np.float32)")
        assert all(text in block for text in signs), "the reader changed: update this benchmark"
        for text in signs:
            block = block.replace(text, text.replace("float32", "int32"))
    namespace: dict = {}
    exec(compile(block, "docs/export.md", "exec"), namespace)
    return namespace


def timed(fn, reps: int) -> float:
    """Median wall seconds of ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--int32-images", type=int, default=1_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    import binax
    import binax.data
    import binax.export as bx
    from configs import default

    config = default.get_config()
    model = binax.train.create_model(config.model)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 28, 28, 1)))
    packed = bx.export(model, variables, preprocessing="fashion_mnist")
    raw = binax.data.load_arrays("fashion_mnist", "test")[0][: args.images]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "default.npz")
        packed.save(path)
        predict = doc_reader()["predict"]
        predict_int32 = doc_reader(int32=True)["predict"]
        want = np.asarray(packed(raw))
        got = predict(path, raw)
        small = raw[: args.int32_images]
        got_int32 = predict_int32(path, small)
        float32_s = timed(lambda: predict(path, raw), args.reps)
        int32_s = timed(lambda: predict_int32(path, small), max(1, args.reps // 3))
    scale = float(np.abs(want).max())
    emit(
        kind="numpy_reader",
        model="bnn_mlp 784-1024x3-10 (configs/default.py)",
        images=len(raw),
        float32_seconds=round(float32_s, 3),
        int32_images=len(small),
        int32_seconds=round(int32_s, 3),
        int32_seconds_scaled_to_images=round(int32_s * len(raw) / len(small), 1),
        speedup=round(int32_s * len(raw) / len(small) / float32_s, 1),
        # Float stages (first layer, classifier, float BatchNorms) round as numpy's BLAS
        # does, not as XLA: a binarized pre-activation within that rounding of 0 flips
        # (docs/export.md, "What equality holds"); the integer stages are exact.
        predictions_differing_from_packed=int(np.sum(got.argmax(-1) != want.argmax(-1))),
        median_abs_logit_diff_over_max=float(np.median(np.abs(got - want)) / scale),
        int32_equals_float32=bool(np.allclose(got_int32, got[: len(small)], rtol=1e-6, atol=1e-6 * scale)),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        numpy=np.__version__,
    )


if __name__ == "__main__":
    main()
