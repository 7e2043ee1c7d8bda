"""Pack a trained run for inference: ``python -m experiments.export --workdir DIR``.

Restores the run (``binax.train.restore_variables``: ``DIR/config.json`` and its best
checkpoint, i.e. highest eval accuracy, the latest when none was evaluated; ``--step
latest`` or a step number to choose), packs the model with ``binax.export`` and writes
``DIR/packed_<model>.npz`` (``--out FILE``, or ``--out FOLDER/``; missing folders are
created, every file is written atomically) and, next to it, the same inference as a
``jax.export`` artifact ``packed_<model>.jaxexport`` that runs without binax
(``--noportable`` to skip). Prints the bit-aware summary (``binax.summary``), the
per-layer packed report, the chosen checkpoint's step and the eval accuracy recorded with
it, and the size table; then checks on ``--check`` random raw images the packed file
(loaded back) against the training graph in eval mode (printed), and the artifact against
the packed file: identical predictions and logits within ``ARTIFACT_RTOL`` of the largest
|logit|, else the command exits with status 1.

The file records the run's input preprocessing (``config.data``: dataset, normalize
mode), so the packed model takes raw images::

    packed = binax.export.load("DIR/packed_vgg_small.npz")
    logits = packed(uint8_images)          # (N, H, W, C) raw pixels in [0, 255]

(docs/export.md: the format, a numpy reader, the jax-only artifact.) A run that used a
binarizer of its own (docs/custom_binarizer.md) needs the module that registers it:
``--import mymodule`` (a config naming it as ``'mymodule:function'`` imports it by
itself). Loading the packed file needs it only for an input quantizer whose declared
forward is not ``"sign"``; the ``.jaxexport`` artifact never does.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags

from binax import binarizers
from binax.errors import BinaxError

#: The artifact's logits may differ from the packed model's by this fraction of the
#: largest |logit|: XLA compiles the deserialized module by itself and may order the float
#: stages' sums differently (measured: 4.8e-7 for logits up to 4.2, digits quick run).
#: Predictions must be identical.
ARTIFACT_RTOL = 1e-5

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
_OUT = flags.DEFINE_string(
    "out", None, "Output file, or a folder (ending in '/', or existing) for packed_<model>.npz in it; missing "
    "folders are created (default: WORKDIR/packed_<model>.npz)."
)
_STEP = flags.DEFINE_string("step", "best", "'best', 'latest' or a checkpoint step number.")
_RUNTIME = flags.DEFINE_enum("runtime", "auto", ["auto", "chain", "generic"], "Packed runtime (binax.export.export).")
_INPUT_SHAPE = flags.DEFINE_string(
    "input_shape", None, "H,W,C of one image, for a dataset without a fixed image shape (a generic tfds "
    "dataset); default: the dataset's (binax.data registry)."
)
_CHECK = flags.DEFINE_integer("check", 16, "Random raw images to compare with the eval graph (0: skip).")
_PORTABLE = flags.DEFINE_bool(
    "portable", True, "Also write the jax.export artifact (.jaxexport next to the .npz; runs with jax alone)."
)
_IMPORT = flags.DEFINE_multi_string(
    "import", [], "Module(s) to import first, e.g. one that registers the run's own binarizers "
    "(binax.binarizers.register); repeat the flag or separate names by commas."
)
_FORMAT = flags.DEFINE_enum(
    "format", "packed", ["packed", "lce"], "'packed': binax's packed .npz (+ .jaxexport); 'lce': a Larq Compute "
    "Engine .tflite, WORKDIR/model.tflite unless --out (binax.export.lce; needs pip install 'binax[lce]')."
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of an error in the workdir or flags.")


def input_shape(override: str | None) -> tuple[int, ...] | None:
    """``--input_shape H,W,C`` as a tuple (None: the dataset's)."""
    if not override:
        return None
    from binax.errors import ConfigError

    try:
        return tuple(int(v) for v in override.split(","))
    except ValueError:
        raise ConfigError(f"--input_shape must be comma-separated ints such as 32,32,3; got {override!r}.") from None


class CheckFailed(BinaxError, RuntimeError):
    """The ``.jaxexport`` artifact does not compute what the packed file computes."""


def output_path(out: str | None, workdir: str, name: str) -> str:
    """Where the packed file goes: ``out`` (a file, or a folder for ``packed_<name>.npz``)."""
    default = f"packed_{name}.npz"
    if not out:
        return os.path.join(workdir, default)
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, default)
    return out


def recorded_accuracy(workdir: str, step: int) -> float | None:
    """The eval accuracy saved with checkpoint ``step`` (what chose it as the best), or None."""
    from binax.train import Checkpoints

    ckpts = Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), async_save=False)
    try:
        metrics = ckpts.manager.metadata(step).metrics or {}
    finally:
        ckpts.close()
    value = metrics.get("accuracy")
    return None if value is None else float(value)


def compare_logits(ref: np.ndarray, got: np.ndarray, rtol: float = ARTIFACT_RTOL) -> tuple[bool, str]:
    """``(agree, one line)``: identical predictions and ``max|got - ref| <= rtol · max|ref|``."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        return False, f"logits of shape {got.shape}, expected {ref.shape}"
    same = int(np.sum(ref.argmax(-1) == got.argmax(-1)))
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    bound = rtol * float(np.max(np.abs(ref))) if ref.size else 0.0
    ok = same == len(ref) and diff <= bound  # NaN anywhere fails both
    text = (
        f"predictions identical on {same} of {len(ref)} images, max |logit difference| {diff:.3g} "
        f"({'within' if diff <= bound else 'OVER'} the tolerance {bound:.3g} = {rtol:g} x max |logit|)"
    )
    return ok, text


def portable_path(out: str) -> str:
    """Where the ``jax.export`` artifact of the packed file ``out`` goes."""
    return (out[: -len(".npz")] if out.endswith(".npz") else out) + ".jaxexport"


def size_table(summary, packed, file_bytes: int, variables, portable_bytes: int | None = None) -> str:
    """float32 vs packed sizes (bytes)."""
    float32 = 4 * sum(int(np.size(a)) for a in jax.tree.leaves(variables))
    rows = [
        ("float32 (every param and batch statistic, 4 B)", float32),
        ("summary estimate (binary params at 1 bit)", round(summary.totals.memory_bytes)),
        ("packed arrays", packed.nbytes),
        ("packed file (.npz)", file_bytes),
    ]
    if portable_bytes:
        rows.append(("jax.export artifact (.jaxexport)", portable_bytes))
    lines = [f"{'':50s} {'bytes':>12s} {'vs float32':>11s}"]
    for label, n in rows:
        lines.append(f"{label:50s} {n:12,d} {float32 / n:10.2f}x")
    t = summary.totals
    lines.append(
        f"binary params {t.binary_params:,}, float params {t.float_params:,}; "
        f"binary ops {t.binary_ops:,}, float MACs {t.float_macs:,}"
    )
    return "\n".join(lines)


def run(
    workdir: str,
    out: str | None,
    step: str,
    runtime: str,
    shape_override: str | None,
    check: int,
    portable: bool = True,
) -> str:
    import binax
    import binax.export as bx
    from binax import train

    train.quiet_checkpoint_logs()
    model, variables, config, chosen = train.restore_variables(workdir, step)
    variables = jax.tree.map(np.asarray, variables)
    preprocessing = bx.Preprocessing.from_config(config)
    packed = bx.export(
        model, variables, preprocessing=preprocessing, input_shape=input_shape(shape_override), runtime=runtime
    )
    shape = packed.input_shape
    out = output_path(out, workdir, packed.name)
    file_bytes = packed.save(out)
    portable_bytes = packed.save_portable(portable_path(out)) if portable else None

    summary = binax.summary(model, shape)
    print(summary)
    print()
    print(packed.report())
    print()
    accuracy = recorded_accuracy(workdir, chosen)
    recorded = "no eval accuracy saved with it" if accuracy is None else f"eval accuracy {accuracy:.2%} saved with it"
    print(
        f"checkpoint step {chosen} ({step}; {recorded}) of {workdir} -> {out}"
        + (f" (+ {portable_path(out)})" if portable else "")
    )
    print(size_table(summary, packed, file_bytes, variables, portable_bytes))
    if check:
        pre = packed.preprocessing
        raw = np.random.default_rng(0).integers(0, pre.max_value + 1, (check, *shape), dtype=np.uint8)
        ref_model = binax.transforms.inference_model(model)
        ref = train.evaluate(ref_model, variables, train.array_batches(packed.preprocess(raw)), keep_logits=True).logits
        loaded = bx.load(out)
        got = np.asarray(loaded(raw))
        agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        print(
            f"check on {check} random raw images: predictions agree {agree:.0%}, "
            f"max |logit difference| {np.abs(ref - got).max():.3g} (max |logit| {np.abs(ref).max():.3g})"
        )
        if portable:
            with open(portable_path(out), "rb") as f:
                artifact = jax.export.deserialize(f.read())
            ok, text = compare_logits(got, np.asarray(artifact.call(raw)))
            print(f"jax.export artifact vs the packed file: {text}")
            if not ok:
                raise CheckFailed(f"the jax.export artifact {portable_path(out)} disagrees with {out}: {text}.")
    return out


def run_lce(workdir: str, out: str | None, step: str, shape_override: str | None) -> str:
    """``--format lce``: the run's packed chain as an LCE ``.tflite`` (``WORKDIR/model.tflite``)."""
    import binax.export as bx
    from binax import train
    from binax.export import lce

    train.quiet_checkpoint_logs()
    model, variables, config, chosen = train.restore_variables(workdir, step)
    variables = jax.tree.map(np.asarray, variables)
    packed = bx.export(
        model, variables, preprocessing=bx.Preprocessing.from_config(config), input_shape=input_shape(shape_override)
    )
    out = out or os.path.join(workdir, "model.tflite")
    size = lce.export_tflite(packed, out)
    print(packed.report())
    print()
    print(
        f"checkpoint step {chosen} of {workdir} -> {out} ({size:,} bytes, Larq Compute Engine); input: float32 "
        f"(1, {', '.join(map(str, packed.input_shape))}) preprocessed as {packed.preprocessing.describe()}"
    )
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        binarizers.import_plugins(",".join(_IMPORT.value))
        if _FORMAT.value == "lce":
            run_lce(_WORKDIR.value, _OUT.value, _STEP.value, _INPUT_SHAPE.value)
        else:
            run(_WORKDIR.value, _OUT.value, _STEP.value, _RUNTIME.value, _INPUT_SHAPE.value, _CHECK.value, _PORTABLE.value)
    except (BinaxError, ValueError, OSError) as e:
        if _DEBUG.value:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
