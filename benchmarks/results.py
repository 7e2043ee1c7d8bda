"""The same-budget results table: every recipe on Fashion-MNIST, same architecture,
epochs and seeds, written to ``docs/results.md`` with a verdict on each paper claim.

    python -m benchmarks.results                       # MLP 784-512-512-512-10, 5 epochs, 5 seeds
    python -m benchmarks.results --arch cnn --epochs 2 # the CNN table
    python -m benchmarks.results --methods irnet,bnn --seeds 1 --quick   # a smoke run
    python -m benchmarks.results --arch mlp --table-only                 # table from docs/results/mlp.json

Each run is ``configs/recipe.py:method=...,arch=...,seed=...`` in its own workdir under
``--root`` (default ``runs/results_holdout``); a finished run (its ``final.json`` or
``recipe.json``) is not rerun and an interrupted one resumes from its checkpoint, so the
table can be built in parts. Every recipe holds out the last 10,000 training images as the
validation split (``configs/recipe.py``'s ``holdout``): settings were chosen on it, and
the table reports validation and test accuracy.

As each run finishes, its figures (spec, seed, validation and test accuracy, binary ops,
sizes, train time, machine, epochs, and the recipe checks) go into the table's raw results,
``docs/results/<arch>.json`` (written atomically), and the markdown block is rebuilt from
that file alone; ``--table-only`` rebuilds it without any run directory. Prints one JSON
line per run. Statistics and the papers' claims: ``benchmarks/verdicts.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import verdicts  # noqa: E402

# The table's rows: (label, recipe arguments). ABC-Net at three sizes.
SWEEP = [
    ("Full precision", "method=fp"),
    ("BNN (ste_sign, clip)", "method=bnn"),
    ("XNOR-Net", "method=xnor"),
    ("DoReFa 1/1", "method=dorefa"),
    ("Bi-Real (approx_sign)", "method=bireal"),
    ("ReActNet (RPReLU, approx_sign)", "method=reactnet"),
    ("IR-Net (Libra-PB + EDE)", "method=irnet"),
    ("ABC-Net M=1, N=1", "method=abc,m=1,n=1"),
    ("ABC-Net M=3, N=3", "method=abc,m=3,n=3"),
    ("ABC-Net M=5, N=5", "method=abc,m=5,n=5"),
    ("Self-Binarizing (sign + BinaryBN)", "method=sb"),
    ("BinaryDuo's plain binary network (duo_binary)", "method=duo_binary"),
    ("duo_binary for BinaryDuo's total epochs", verdicts.DUO_MATCHED),
    ("BinaryDuo (decoupled, fine-tuned)", "method=binaryduo"),
]
LABELS = {spec: label for label, spec in SWEEP} | {verdicts.DUO_COUPLED: "BinaryDuo's coupled network"}

#: Where a row departs from its paper and official code beyond the shared budget (optimizer,
#: schedule, epochs, architecture); the audit is docs/recipes.md.
DEVIATIONS = {
    "method=xnor": "activation scale K not used",
    "method=bireal": "no real-valued shortcuts (the MLP/CNN have none)",
    "method=reactnet": "no distillation from a float teacher",
    "method=sb": "weights inside tanh scaled by mean\\|w\\|; ν schedule binax's (none published)",
    "method=binaryduo": "fine-tuning lr factor binax's, chosen on validation (none published); ⌊W/√2⌋ widths read from tiny VGG-7 only",
}

#: Fashion-MNIST's training images; the last ``holdout`` of them are the validation split.
FASHION_MNIST_TRAIN = 60_000

#: The keys of a run's summary kept in the raw results, beside spec, seed and costs.
KEEP = (
    "validation_accuracy", "test_accuracy", "train_time_s", "wall_time_s",
    "tanh_test_accuracy", "tanh_validation_accuracy", "agreement",
    "coupled_test_accuracy", "coupled_validation_accuracy", "decoupled_test_accuracy",
    "decoupled_validation_accuracy", "decoupling_max_logit_diff", "decoupling_differing_fraction",
)


def _method(spec: str) -> str:
    """The recipe method of a row's spec: ``"method=abc,m=3,n=3"`` -> ``"abc"``."""
    return spec.split(",")[0][len("method="):]


def _run_dir(root: str, arch: str, spec: str, seed: int) -> str:
    return os.path.join(root, arch, spec.replace("method=", "").replace(",", "_").replace("=", ""), f"seed{seed}")


def _final(workdir: str) -> dict:
    with open(os.path.join(workdir, "final.json")) as f:
        return json.load(f)


def _finished(workdir: str) -> dict | None:
    """The summary of a finished run: ``recipe.json`` for a multi-stage recipe (written
    after its last stage), else the training run's ``final.json``."""
    recipe_json, final_json = os.path.join(workdir, "recipe.json"), os.path.join(workdir, "final.json")
    if os.path.exists(recipe_json):
        with open(recipe_json) as f:
            summary = json.load(f)
        # Resumed if any of its training stages (this workdir or a stage's below it) was.
        stages = [workdir] + [os.path.join(workdir, d) for d in sorted(os.listdir(workdir))]
        resumed = [_final(d).get("resumed_from_step") for d in stages if os.path.exists(os.path.join(d, "final.json"))]
        summary["resumed_from_step"] = next((r for r in resumed if r is not None), None)
        return summary
    if os.path.exists(final_json):
        with open(os.path.join(workdir, "config.json")) as f:
            if json.load(f).get("recipe", {}).get("procedure", "train") == "train":
                return _final(workdir)
    return None


def _config(arch: str, spec: str, seed: int = 0, epochs: int = 0, quick: bool = False):
    from configs import recipe

    return recipe.get_config(f"{spec},arch={arch},seed={seed},epochs={epochs}" + (",quick" if quick else ""))


def total_epochs(config) -> int:
    """Epochs a recipe trains in all: BinaryDuo's coupled epochs plus its fine-tuning."""
    extra = config.recipe.finetune_epochs if config.recipe.procedure == "binaryduo" else 0
    return int(config.num_epochs + extra)


def run_one(arch: str, spec: str, seed: int, epochs: int, root: str, quick: bool) -> dict:
    """Train one recipe (or read its finished result); returns its summary."""
    from binax import recipes, train

    workdir = _run_dir(root, arch, spec, seed)
    done = _finished(workdir)
    if done is not None:
        if "validation_accuracy" not in done:  # trained on all 60,000 images: not this protocol's run
            raise SystemExit(
                f"error: {workdir} holds a run without a validation split (trained before the hold-out); "
                "give a fresh --root"
            )
        return done
    config = _config(arch, spec, seed, epochs, quick)
    config.report_every_seconds = 120.0
    train.quiet_checkpoint_logs()
    t0 = time.time()
    summary = dict(recipes.run(config, workdir))
    summary.setdefault("wall_time_s", time.time() - t0)
    return summary


def deployed_cost(arch: str, spec: str) -> tuple[float, float, int]:
    """(packed bytes, float32 bytes, binary operations per image) of the recipe's deployed
    model (``binax.summary``; BinaryDuo: the decoupled network, Self-Binarizing: sign).
    Binary operations are binary MACs times their planes (ABC-Net M·N)."""
    import binax
    from binax import train, transforms

    config = _config(arch, spec)
    model = train.create_model(config.model)
    if config.recipe.procedure == "binaryduo":
        import jax
        import jax.numpy as jnp

        variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))
        variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
        model, _, _ = transforms.decouple_binaryduo_model(model, variables)
    if config.recipe.procedure == "self_binarizing":
        model = transforms.inference_model(model)
    totals = binax.summary(model, (28, 28, 1)).totals
    return totals.memory_bytes, totals.float32_bytes, totals.binary_ops


def machine() -> str:
    """This process's machine: CPU, cores it may use, XLA threading flags."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pinned = f", pinned to core(s) {','.join(map(str, cores))}" if cores and len(cores) < os.cpu_count() else ""
    xla = os.environ.get("XLA_FLAGS")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{pinned}" + (
        f" (XLA_FLAGS={xla})" if xla else "") + ", CPU only"


def code_version(root: str = ROOT) -> str:
    """The git commit of the code that trains (``+changes`` when its tracked library, config
    or benchmark files differ from it): the same commit, machine and seed give the same
    figures, another commit may not. ``unknown`` outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "binax", "configs", "benchmarks")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def record(spec: str, seed: int, summary: dict, cost: tuple, epochs: int, where: str, date: str,
           code: str | None = None) -> dict:
    """One run's entry in the raw results (``code``: :func:`code_version`)."""
    packed, float32, ops = cost
    kept = {k: summary[k] for k in KEEP if summary.get(k) is not None}
    return dict(spec=spec, seed=seed, epochs=epochs, binary_ops=int(ops), packed_bytes=int(packed),
                float32_bytes=int(float32), resumed=summary.get("resumed_from_step") is not None,
                machine=where, date=date, **({"code": code} if code else {}), **kept)


def json_path(arch: str) -> str:
    return os.path.join(ROOT, "docs", "results", f"{arch}.json")


def write_raw(path: str, table: dict) -> None:
    """The raw results, runs in table order then by seed, atomically (``binax.files``)."""
    from binax import files

    order = {spec: i for i, (_, spec) in enumerate(SWEEP)}
    table["runs"].sort(key=lambda r: (order.get(r["spec"], len(order)), r["seed"]))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a new --raw folder
    files.write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")


def merge_recorded(path: str, table: dict) -> dict:
    """``table`` with the runs another process has recorded in ``path`` since (same epochs
    and hold-out; its own runs win), so that processes sharing a table lose no run."""
    if not os.path.exists(path):
        return table
    with open(path) as f:
        disk = json.load(f)
    if (disk["epochs"], disk["holdout"]) != (table["epochs"], table["holdout"]):
        return table
    mine = {(r["spec"], r["seed"]) for r in table["runs"]}
    return {**table, "runs": table["runs"] + [r for r in disk["runs"] if (r["spec"], r["seed"]) not in mine]}


def _pct(values) -> list[float]:
    return [100 * v for v in values]


def _mean_interval(values: list[float]) -> str:
    if not values:
        return "—"
    mean, half = verdicts.t_interval(_pct(values))
    return f"{mean:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")


def _extra_lines(spec: str, runs: list[dict]) -> list[str]:
    """Per-seed figures of the multi-stage recipes: the SB deployment check, BinaryDuo's stages."""
    def val(r, key):
        return f" (validation {100 * r[key]:.2f}%)" if key in r else ""

    if spec == "method=sb" and all("agreement" in r for r in runs):
        seeds = "; ".join(
            f"seed {r['seed']}: tanh at nu_max {100 * r['tanh_test_accuracy']:.2f}%{val(r, 'tanh_validation_accuracy')}, "
            f"sign + BinaryBN {100 * r['test_accuracy']:.2f}%, prediction agreement {100 * r['agreement']:.2f}%"
            for r in runs)
        worst = min(r["agreement"] for r in runs)
        return [f"{LABELS[spec]}, deployment check (of binax's folding, not a claim of the paper): the sign + "
                f"BinaryBN network's test predictions agree with the trained tanh network's on {100 * worst:.2f}% of "
                f"the 10,000 test images at worst over {len(runs)} seed(s). {seeds}"]
    if spec == "method=binaryduo" and all("coupled_test_accuracy" in r for r in runs):
        parts = []
        for r in runs:
            differing = round(r.get("decoupling_differing_fraction", 0.0) * 10000)
            moved = f"; logits moved on {differing} of 10,000 images by float rounding at a threshold" if differing else ""
            parts.append(
                f"seed {r['seed']}: coupled ternary {100 * r['coupled_test_accuracy']:.2f}%"
                f"{val(r, 'coupled_validation_accuracy')}, decoupled {100 * r['decoupled_test_accuracy']:.2f}% "
                f"(max |logit diff| {r['decoupling_max_logit_diff']:.1e}{moved}), fine-tuned "
                f"{100 * r['test_accuracy']:.2f}%{val(r, 'validation_accuracy')}")
        return [f"{LABELS[spec]}: " + "; ".join(parts)]
    return []


def render_block(table: dict) -> str:
    """The markdown block of one table, from its raw results alone."""
    arch, epochs, seeds = table["arch"], table["epochs"], table["seeds"]
    by_spec: dict[str, list[dict]] = {}
    for r in table["runs"]:
        by_spec.setdefault(r["spec"], []).append(r)
    complete = all(len(by_spec.get(spec, [])) == seeds for _, spec in SWEEP)
    seeds_text = f"{seeds} seed(s) each" if complete else f"of {seeds} planned seeds, n finished per row as shown (partial)"
    arch_text = {"mlp": "MLP 784-512-512-512-10 (`bnn_mlp`, widths 512)", "cnn": "CNN 32-32-64-64 (`cnn_small`)"}[arch]
    finetune = max(1, round(epochs / 3))
    fp = by_spec.get("method=fp")
    fp_mean = statistics.fmean(_pct(r["test_accuracy"] for r in fp)) if fp else None
    lines = [
        f"## Fashion-MNIST, {arch_text}",
        "",
        f"Same budget for every method: {epochs} epochs, batch 128, Adam 1e-3 with cosine decay, no weight decay, "
        f"{seeds_text}; first layer and classifier full precision. Trained on the first "
        f"{FASHION_MNIST_TRAIN - table['holdout']:,} training images; "
        f"the last {table['holdout']:,} are the validation split, on which every recipe setting was chosen. "
        f"BinaryDuo trains its coupled ternary network for the same {epochs} epochs, then fine-tunes the decoupled "
        f"network for {finetune} more (its paper's procedure); `duo_binary` is trained both for {epochs} epochs "
        f"and for BinaryDuo's total {epochs + finetune}. Accuracy: mean ± half-width of the 95% t-interval over "
        "seeds, on the validation split and on the 10,000 test images. Binary ops: 1-bit products per image of the "
        "deployed network (`binax.summary`'s binary MACs times their planes; ABC-Net M·N). Train time: mean over "
        "the runs that were not interrupted and resumed. Deviation: where the row departs from its paper beyond "
        "the shared budget (docs/recipes.md).",
        "",
        "| method | validation accuracy (%) | test accuracy (%) | gap to FP, test (points) | binary ops | packed size "
        "| float32 size | train time / run | deviation from the paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    extra = []
    for label, spec in SWEEP:
        runs = by_spec.get(spec)
        if not runs:
            continue
        test = [r["test_accuracy"] for r in runs]
        valid = [r["validation_accuracy"] for r in runs if "validation_accuracy" in r]
        mean = statistics.fmean(_pct(test))
        gap = "—" if fp_mean is None or spec == "method=fp" else f"{mean - fp_mean:+.2f}"
        times = [r.get("train_time_s") or r.get("wall_time_s") or 0.0 for r in runs if not r["resumed"]]
        t = f"{statistics.fmean(times):.0f} s" if times else "—"
        first = runs[0]
        ops = f"{first['binary_ops'] / 1e6:.3f} M" if first["binary_ops"] else "0"
        lines.append(
            f"| {label} | {_mean_interval(valid)} (n={len(valid)}) | {_mean_interval(test)} (n={len(test)}) | {gap} | "
            f"{ops} | {first['packed_bytes'] / 1024:.0f} KiB | {first['float32_bytes'] / 1024:.0f} KiB | {t} | "
            f"{DEVIATIONS.get(spec, '—')} |"
        )
        extra += _extra_lines(spec, runs)
    for line in extra:
        lines += ["", line]
    values = {spec: _pct(r["test_accuracy"] for r in runs) for spec, runs in by_spec.items()}
    duo = by_spec.get("method=binaryduo", [])
    if duo and all("coupled_test_accuracy" in r for r in duo):
        values[verdicts.DUO_COUPLED] = _pct(r["coupled_test_accuracy"] for r in duo)
    lines += ["", *verdicts.verdict_lines(values, LABELS), "", _machine_line(table["runs"])]
    return "\n".join(lines) + "\n"


def _machine_line(runs: list[dict]) -> str:
    """Where and when the runs ran, and their total wall time."""
    machines = sorted({r["machine"] for r in runs})
    dates = sorted({r["date"] for r in runs})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    wall = sum(r.get("wall_time_s") or 0.0 for r in runs)
    codes = sorted({r["code"] for r in runs if r.get("code")})
    coded = sum(1 for r in runs if r.get("code"))
    code = (f"; code: commit {', '.join(codes)}" + (f" ({coded} of {len(runs)} runs recorded one)" if coded < len(runs) else "")
            if codes else "")
    return (f"Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}; {when}{code}; "
            f"total wall time of this table's runs {wall / 60:.0f} min.")


def replace_block(text: str, arch: str, block: str) -> str:
    """``text`` (results.md) with the generated block of ``arch`` replaced (or appended)."""
    begin, end = f"<!-- results:{arch} -->", f"<!-- /results:{arch} -->"
    if begin in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        return f"{head}{begin}\n{block}{end}{tail}"
    return f"{text.rstrip()}\n\n{begin}\n{block}{end}\n"


def generated_block(text: str, arch: str) -> str | None:
    """The block of ``arch`` as it stands in ``text``, without its markers."""
    begin, end = f"<!-- results:{arch} -->\n", f"<!-- /results:{arch} -->"
    if begin not in text:
        return None
    return text.partition(begin)[2].partition(end)[0]


def write_markdown(path: str, table: dict) -> None:
    from binax import files

    old = open(path).read() if os.path.exists(path) else "# Results\n\n"
    files.write_text(path, replace_block(old, table["arch"], render_block(table)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="", help="comma-separated recipe methods (default: all rows)")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "results_holdout"))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--raw", default=None, help="the raw results JSON (default docs/results/<arch>.json)")
    parser.add_argument("--quick", action="store_true", help="tiny runs (pipeline check, not results)")
    parser.add_argument("--table-only", action="store_true", help="rebuild the block from the raw JSON; train nothing")
    args = parser.parse_args()
    raw = args.raw or json_path(args.arch)
    if args.table_only:
        if not os.path.exists(raw):
            parser.error(f"--table-only: no raw results at {raw}; run the table first")
        with open(raw) as f:
            write_markdown(args.output, json.load(f))
        return
    wanted = set(filter(None, args.methods.split(",")))
    known = {_method(spec) for _, spec in SWEEP}
    if wanted - known:
        parser.error(f"--methods: unknown {sorted(wanted - known)}; the table's methods are {sorted(known)}")
    from configs import recipe

    table = dict(arch=args.arch, epochs=args.epochs, seeds=args.seeds, holdout=recipe.HOLDOUT, runs=[])
    table = merge_recorded(raw, table)
    recorded = {(r["spec"], r["seed"]) for r in table["runs"]}
    where, today, code = machine(), time.strftime("%Y-%m-%d"), code_version()
    # Seed-major order: the first pass gives a whole (one-seed) table early. Rows left out
    # by --methods keep their recorded runs.
    for seed in range(args.seeds):
        for _, spec in SWEEP:
            if (spec, seed) in recorded or (wanted and _method(spec) not in wanted):
                continue
            summary = run_one(args.arch, spec, seed, args.epochs, args.root, args.quick)
            print(json.dumps({"arch": args.arch, "spec": spec, "seed": seed, **summary}), flush=True)
            epochs = total_epochs(_config(args.arch, spec, seed, args.epochs, args.quick))
            table["runs"].append(record(spec, seed, summary, deployed_cost(args.arch, spec), epochs, where, today, code))
            if not args.quick:  # a smoke run's figures are not results: printed, not written
                table = merge_recorded(raw, table)  # e.g. a second process on the other core
                write_raw(raw, table)
                write_markdown(args.output, table)


if __name__ == "__main__":
    from benchmarks.cli import resumable

    with resumable("benchmarks.results"):
        main()
