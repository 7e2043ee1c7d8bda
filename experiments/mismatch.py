"""Gradient-mismatch table: ``python -m experiments.mismatch [--quick] [--output FILE.json]``.

Runs the study of ``binax.mismatch_study`` (small ``bnn_mlp`` networks trained on
Fashion-MNIST, each backward estimator's gradient against the gradient of the
Gaussian-smoothed loss), prints its markdown tables and writes every row, the settings,
the accuracies, the machine and the wall time as JSON.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from binax import files, train
from binax.mismatch_study import _jsonable, report, run_study

_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings (seconds): a smoke test of the command.")
_WIDTHS = flags.DEFINE_list("widths", ["256", "256", "256"], "Hidden widths of the bnn_mlp.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 400, "Adam steps per network (batch 128, lr 1e-3).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Test images the loss is measured on.")
_ACT_SIGMAS = flags.DEFINE_list("act_sigmas", ["0.01", "0.03", "0.1", "0.3"], "σ for pre-activation smoothing.")
_WEIGHT_SIGMAS = flags.DEFINE_list("weight_sigmas", ["0.01", "0.03", "0.1"], "σ for weight smoothing (empty: skip).")
_NUM_SAMPLES = flags.DEFINE_list("num_samples", ["256", "1024"], "Monte-Carlo pair counts (the largest is drawn once).")
_LAYER = flags.DEFINE_string("layer", "fc1", "Module whose input (activations) and kernel (weights) are smoothed.")
_MAX_CHANNELS = flags.DEFINE_integer("max_channels", 8, "Output channels of the kernel smoothed (weights).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training and of the Monte-Carlo samples.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where each network's training run goes (WORKDIR/<network>: checkpoints, metrics), so a "
    "stopped study resumes; default: temporary directories.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file to write (default runs/mismatch/mismatch.json under the current directory).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    train.quiet_checkpoint_logs()
    # The study prints one line per network; the loop's INFO lines (its config, its sizes)
    # would repeat for each. Warnings still show.
    logging.set_verbosity(logging.WARNING)
    if _QUICK.value:
        kwargs = dict(widths=(32, 32), train_steps=20, batch_size=64, act_sigmas=(0.1,), weight_sigmas=(0.05,),
                      num_samples=(48,), max_channels=4, chunk_size=8, num_groups=3)
    else:
        kwargs = dict(widths=tuple(int(w) for w in _WIDTHS.value), train_steps=_TRAIN_STEPS.value,
                      batch_size=_BATCH.value, act_sigmas=tuple(float(s) for s in _ACT_SIGMAS.value),
                      weight_sigmas=tuple(float(s) for s in _WEIGHT_SIGMAS.value),
                      num_samples=tuple(int(n) for n in _NUM_SAMPLES.value), max_channels=_MAX_CHANNELS.value)
    result = run_study(layer=_LAYER.value, seed=_SEED.value, workdir=_WORKDIR.value, **kwargs)
    output = _OUTPUT.value or os.path.join("runs", "mismatch", "mismatch.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    files.write_json(output, _jsonable(result), indent=1, ensure_ascii=False)
    print(report(result))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    app.run(main)
