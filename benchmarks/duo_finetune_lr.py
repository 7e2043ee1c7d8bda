"""BinaryDuo's fine-tuning learning-rate factor chosen on VALIDATION accuracy.

The official code takes the learning rate from the command line (``-LR``) and publishes
no runs' values, so the factor by which fine-tuning scales the coupled network's learning
rate is binax's choice (``binax.recipes.FINETUNE_LR_FACTOR``). This trains
``configs/recipe.py:method=binaryduo``'s coupled network once per seed, then decouples it
and fine-tunes with each factor, and scores the fine-tuned network on the validation split
(the last 10,000 training images, never trained on); the rule is
``benchmarks.selection.choose``. Test accuracy is printed but chooses nothing.

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python -m benchmarks.duo_finetune_lr --seeds 0,1                 # MLP, 5 epochs
    python -m benchmarks.duo_finetune_lr --arch cnn --epochs 2 --coupled-root runs/results_holdout

``--coupled-root`` reuses the coupled networks the results table has trained
(``<root>/<arch>/binaryduo/seed<k>/coupled``), which are this config's. One JSON line per
run, then one per factor (mean validation and test accuracy) and the chosen factor. Runs
live in ``--root/<arch>/seed<k>/{coupled,factor_<f>}`` and are not rerun once finished.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.selection import summary_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTORS = (1.0, 0.1, 0.01)


def base_config(arch: str, seed: int, epochs: int):
    """``configs/recipe.py:method=binaryduo`` with its validation hold-out."""
    from configs import recipe

    config = recipe.get_config(f"method=binaryduo,arch={arch},seed={seed},epochs={epochs}")
    config.report_every_seconds = 300.0
    return config


def coupled_dir(root: str, arch: str, seed: int, coupled_root: str | None) -> str:
    """The table's coupled network for this seed when ``coupled_root`` has a finished one,
    else this study's own (trained by :func:`main`)."""
    if coupled_root:
        table = os.path.join(coupled_root, arch, "binaryduo", f"seed{seed}", "coupled")
        if os.path.exists(os.path.join(table, "final.json")):
            return table
    return os.path.join(root, arch, f"seed{seed}", "coupled")


def finetune(config, coupled: str, factor: float, workdir: str) -> dict:
    """Decouple ``coupled`` and fine-tune at ``factor`` × the coupled learning rate."""
    from binax import files, recipes, train

    _, dvars, overrides, checks = recipes.decouple(config, coupled)
    final = train.train_and_evaluate(recipes.finetune_config(config, overrides, factor), workdir, init_variables=dvars)
    summary = {"factor": factor, **checks, **{k: final.get(k) for k in (
        "validation_accuracy", "test_accuracy", "train_time_s")}}
    files.write_json(os.path.join(workdir, "study.json"), summary, sort_keys=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--factors", default=",".join(map(str, FACTORS)))
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "duo_finetune_lr"))
    parser.add_argument("--coupled-root", default=None, help="the results table's --root, to reuse its coupled runs")
    args = parser.parse_args()
    from binax import train

    train.quiet_checkpoint_logs()
    results: dict[str, list[dict]] = {}
    for seed in map(int, args.seeds.split(",")):
        config = base_config(args.arch, seed, args.epochs)
        coupled = coupled_dir(args.root, args.arch, seed, args.coupled_root)
        if not os.path.exists(os.path.join(coupled, "final.json")):  # the table's dirs are only read
            train.train_and_evaluate(config, coupled)
        for factor in map(float, args.factors.split(",")):
            workdir = os.path.join(args.root, args.arch, f"seed{seed}", f"factor_{factor:g}")
            done = os.path.join(workdir, "study.json")
            summary = json.load(open(done)) if os.path.exists(done) else finetune(config, coupled, factor, workdir)
            results.setdefault(f"{factor:g}", []).append(summary)
            print(json.dumps({"seed": seed, "coupled": coupled, **summary}), flush=True)
    for line in summary_lines(results):
        print(json.dumps(line))


if __name__ == "__main__":
    from benchmarks.cli import resumable

    with resumable("benchmarks.duo_finetune_lr"):
        main()
