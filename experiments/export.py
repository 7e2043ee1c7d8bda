"""Pack a trained run for inference: ``python -m experiments.export --workdir DIR``.

Reads the config the training run recorded (``DIR/config.json``) and its best checkpoint
(highest eval accuracy; the latest when none was evaluated; ``--step latest`` or a step
number to choose), packs the model with ``binax.export`` and writes ONE file
(``DIR/packed_<model>.npz`` unless ``--out``). Prints the bit-aware summary
(``binax.summary``), the per-layer packed report and the size table, and checks the packed
model against the training graph in eval mode on ``--check`` random images.

The packed model takes what the training pipeline feeds the model (normalized float NHWC
images): ``binax.export.load(path)(images) -> logits``.

A run that used a binarizer of its own (docs/custom_binarizer.md) needs the module that
registers it: ``--import mymodule`` (a config naming it as ``'mymodule:function'``
imports it by itself). Loading the packed file needs it as well.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import app, flags

from binax import binarizers

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory (config.json, checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output file (default: WORKDIR/packed_<model>.npz).")
_STEP = flags.DEFINE_string("step", "best", "'best', 'latest' or a checkpoint step number.")
_RUNTIME = flags.DEFINE_enum("runtime", "auto", ["auto", "chain", "generic"], "Packed runtime (binax.export.export).")
_INPUT_SHAPE = flags.DEFINE_string(
    "input_shape", None, "H,W,C of one image; default: the dataset's (binax.data registry)."
)
_CHECK = flags.DEFINE_integer("check", 16, "Random images to compare with the eval graph (0: skip).")
_IMPORT = flags.DEFINE_multi_string(
    "import", [], "Module(s) to import first, e.g. one that registers the run's own binarizers "
    "(binax.binarizers.register); repeat the flag or separate names by commas."
)


def read_config(workdir: str) -> dict:
    """``workdir/config.json`` as written by ``binax.train.train_and_evaluate``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no config.json; is it a training run's --workdir?")
    with open(path) as f:
        config = json.load(f)
    if not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise ValueError(f"{path} has no model.name; it is not a binax training config.")
    return config


def input_shape(config: dict, override: str | None) -> tuple[int, ...]:
    if override:
        try:
            return tuple(int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"--input_shape must be comma-separated ints such as 32,32,3; got {override!r}.") from None
    from binax.data import registry

    name = config.get("data", {}).get("name")
    shape = registry.get_spec(name).image_shape if name else None
    if shape is None:
        raise ValueError(f"dataset {name!r} has no fixed image shape; pass --input_shape H,W,C.")
    return tuple(shape)


def size_table(summary, packed, file_bytes: int, variables) -> str:
    """float32 vs packed sizes (bytes)."""
    float32 = 4 * sum(int(np.size(a)) for a in jax.tree.leaves(variables))
    rows = [
        ("float32 (every param and batch statistic, 4 B)", float32, 1.0),
        ("summary estimate (binary params at 1 bit)", round(summary.totals.memory_bytes), None),
        ("packed arrays", packed.nbytes, None),
        ("packed file (.npz)", file_bytes, None),
    ]
    lines = [f"{'':50s} {'bytes':>12s} {'vs float32':>11s}"]
    for label, n, _ in rows:
        lines.append(f"{label:50s} {n:12,d} {float32 / n:10.2f}x")
    lines.append(
        f"binary params {summary.binary_params:,}, float params {summary.float_params:,}; "
        f"binary MACs {summary.binary_macs:,}, float MACs {summary.float_macs:,}"
    )
    return "\n".join(lines)


def run(workdir: str, out: str | None, step: str, runtime: str, shape_override: str | None, check: int) -> str:
    import binax
    import binax.export as bx
    from binax import train

    train.quiet_checkpoint_logs()
    config = read_config(workdir)
    model_cfg = dict(config["model"])
    name = model_cfg.pop("name")
    shape = input_shape(config, shape_override)
    _, variables, _, chosen = train.restore_variables(workdir, step)
    variables = jax.tree.map(np.asarray, variables)
    packed = bx.export(name, model_cfg, variables, shape, runtime=runtime)
    out = out or os.path.join(workdir, f"packed_{name}.npz")
    file_bytes = packed.save(out)

    model = binax.models.create(name, **model_cfg)
    summary = binax.summary(model, shape)
    print(summary)
    print()
    print(packed.report())
    print()
    print(f"checkpoint step {chosen} of {workdir} -> {out}")
    print(size_table(summary, packed, file_bytes, variables))
    if check:
        x = np.random.default_rng(0).standard_normal((check, *shape)).astype(np.float32)
        ref_model = binax.models.create(name, **bx.inference_config(model_cfg))
        ref = train.evaluate(ref_model, variables, train.array_batches(x), keep_logits=True).logits
        got = np.asarray(bx.load(out)(x))
        agree = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
        print(
            f"check on {check} random images: predictions agree {agree:.0%}, "
            f"max |logit difference| {np.abs(ref - got).max():.3g} (max |logit| {np.abs(ref).max():.3g})"
        )
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        binarizers.import_plugins(",".join(_IMPORT.value))
        run(_WORKDIR.value, _OUT.value, _STEP.value, _RUNTIME.value, _INPUT_SHAPE.value, _CHECK.value)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
