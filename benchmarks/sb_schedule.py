"""Self-Binarizing's ν schedule chosen on VALIDATION accuracy: the variants docs/recipes.md
lists, each trained as ``configs/recipe.py:method=sb`` with its schedule replaced, scored by
the deployed sign + BinaryBN network's accuracy on the validation split (the last 10,000
training images, never trained on). Test accuracy is printed too but chooses nothing.

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python -m benchmarks.sb_schedule --seeds 0,1          # MLP, 5 epochs (~1-2 min a run)
    python -m benchmarks.sb_schedule --table-only             # the summary from finished runs

One JSON line per run, then one per variant (mean validation and test accuracy over the
seeds) and the chosen variant (highest mean validation accuracy). Runs live in
``--root/<variant>/seed<k>`` and are not rerun once finished.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.selection import summary_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: name -> (activation schedule, relative weights): nu_0 -> nu_start over [0, start], then -> nu_max.
VARIANTS = {
    "one_nu_1_until_90": (dict(nu_0=1.0, nu_start=1.0, nu_max=1e9, start=0.9), False),
    "one_nu_1_until_50": (dict(nu_0=1.0, nu_start=1.0, nu_max=1e9, start=0.5), False),
    "relative_1_until_90": (dict(nu_0=1.0, nu_start=1.0, nu_max=1e9, start=0.9), True),
    "relative_1_until_50": (dict(nu_0=1.0, nu_start=1.0, nu_max=1e9, start=0.5), True),
    "relative_1_to_3_until_90": (dict(nu_0=1.0, nu_start=3.0, nu_max=1e9, start=0.9), True),
    "relative_1_to_10_until_90": (dict(nu_0=1.0, nu_start=10.0, nu_max=1e9, start=0.9), True),
    "relative_1_to_30_until_90": (dict(nu_0=1.0, nu_start=30.0, nu_max=1e9, start=0.9), True),
    "relative_1_to_10_until_80": (dict(nu_0=1.0, nu_start=10.0, nu_max=1e9, start=0.8), True),
}


def variant_config(name: str, arch: str, seed: int, epochs: int):
    """``configs/recipe.py:method=sb`` (with its validation hold-out) at variant ``name``'s schedule."""
    from configs import recipe

    nu, relative = VARIANTS[name]
    config = recipe.get_config(f"method=sb,arch={arch},seed={seed},epochs={epochs}")
    config.model.input_quantizer_kwargs = dict(nu)
    config.model.kernel_quantizer_kwargs = {**nu, "relative": relative}
    config.report_every_seconds = 300.0
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "sb_schedule"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    from binax import recipes, train

    train.quiet_checkpoint_logs()
    results: dict[str, list[dict]] = {}
    for seed in map(int, args.seeds.split(",")):
        for name in args.variants.split(","):
            workdir = os.path.join(args.root, args.arch, name, f"seed{seed}")
            done = os.path.join(workdir, "recipe.json")
            if os.path.exists(done):
                summary = json.load(open(done))
            elif args.table_only:
                continue
            else:
                summary = recipes.run(variant_config(name, args.arch, seed, args.epochs), workdir)
            results.setdefault(name, []).append(summary)
            print(json.dumps({"variant": name, "seed": seed, **{k: summary.get(k) for k in (
                "validation_accuracy", "test_accuracy", "tanh_validation_accuracy", "agreement", "train_time_s")}}),
                flush=True)
    for line in summary_lines(results):
        print(json.dumps(line))


if __name__ == "__main__":
    from benchmarks.cli import resumable

    with resumable("benchmarks.sb_schedule"):
        main()
