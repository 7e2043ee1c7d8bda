"""The same-budget results table: every recipe on Fashion-MNIST, same architecture,
epochs and seeds, written to ``docs/results.md`` with a verdict on each paper claim.

    python benchmarks/results.py                       # MLP 784-512-512-512-10, 5 epochs, 5 seeds
    python benchmarks/results.py --arch cnn --epochs 2 # the CNN table
    python benchmarks/results.py --methods irnet,bnn --seeds 1 --quick   # a smoke run
    python benchmarks/results.py --arch cnn --epochs 2 --table-only     # table from finished runs

Each run is ``configs/recipe.py:method=...,arch=...,seed=...`` in its own workdir under
``--root`` (default ``runs/results``); a finished run (its ``final.json`` or
``recipe.json``) is not rerun and an interrupted one resumes from its checkpoint, so the
table can be built in parts. Prints one JSON line per run; the markdown table is
rewritten after every run from everything finished so far.

Each row gives the mean test accuracy with its 95% t-interval over seeds and the binary
operations of the deployed network (``binax.summary``'s ``binary_ops``). The verdicts compare rows with Welch's
t-test (``scipy.stats.ttest_ind(equal_var=False)``, two-sided, ALPHA = 0.05 per
comparison): a claim "A > B" is *reproduced* when A's mean is higher and p < ALPHA, *not
reproduced* when B's is higher and p < ALPHA, and *not resolved* otherwise; a chain
"A > B > C" is reproduced when every link is, not reproduced when any link is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
    ("BinaryDuo (decoupled, fine-tuned)", "method=binaryduo"),
]

#: Significance level of each Welch t-test in the verdicts.
ALPHA = 0.05

#: The papers' claims: (claim, rows from best to worst as the paper orders them).
CLAIMS = [
    ("IR-Net > XNOR-Net > BNN (Qin et al. 2020)", ["method=irnet", "method=xnor", "method=bnn"]),
    ("BinaryDuo > the plain binary network of the same cost (Kim et al. 2020)", ["method=binaryduo", "method=duo_binary"]),
    ("ABC-Net's gap to full precision shrinks as M, N grow (Lin et al. 2017)",
     ["method=abc,m=5,n=5", "method=abc,m=3,n=3", "method=abc,m=1,n=1"]),
]


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


def run_one(arch: str, spec: str, seed: int, epochs: int, root: str, quick: bool) -> dict:
    """Train one recipe (or read its finished result); returns its summary."""
    from binax import recipes, train
    from configs import recipe

    workdir = _run_dir(root, arch, spec, seed)
    done = _finished(workdir)
    if done is not None:
        return done
    arg = f"{spec},arch={arch},seed={seed},epochs={epochs}" + (",quick" if quick else "")
    config = recipe.get_config(arg)
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
    from configs import recipe

    config = recipe.get_config(f"{spec},arch={arch}")
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


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t-interval at ``level``); half-width NaN for n < 2."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem)


def compare(a: list[float], b: list[float], alpha: float = ALPHA) -> tuple[str, float, float]:
    """Claim "a > b" by Welch's t-test: (verdict, mean(a) - mean(b), two-sided p)."""
    from scipy import stats

    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return "not resolved", diff, float("nan")
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    if math.isnan(p):  # both rows constant
        verdict = "not resolved" if diff == 0 else ("reproduced" if diff > 0 else "not reproduced")
        return verdict, diff, p
    if p >= alpha:
        return "not resolved", diff, p
    return ("reproduced" if diff > 0 else "not reproduced"), diff, p


def p_text(p: float, a: list, b: list) -> str:
    """``p = 0.0123``, or why there is no test (a row with fewer than 2 seeds)."""
    if len(a) < 2 or len(b) < 2:
        return f"no test with n = {len(a)} and {len(b)}"
    return f"p = {p:.3g}"


def chain_verdict(links: list[str]) -> str:
    """A chain of "A > B" links: reproduced if all are, not reproduced if any is not."""
    if "not reproduced" in links:
        return "not reproduced"
    return "reproduced" if links and all(v == "reproduced" for v in links) else "not resolved"


def verdict_lines(rows: list[dict], alpha: float = ALPHA) -> list[str]:
    """The verdicts section: one bullet per claim, each link's difference and p."""
    by_spec = {r["spec"]: r for r in rows}
    lines = [
        "### Verdicts",
        "",
        f"Welch's t-test on the per-seed test accuracies (two-sided, alpha = {alpha} per comparison); "
        "\"A > B\" is reproduced when A is higher with p < alpha, not reproduced when B is higher "
        "with p < alpha, not resolved otherwise.",
        "",
    ]
    for claim, specs in CLAIMS:
        if any(not by_spec.get(s, {}).get("accuracies") for s in specs):
            lines.append(f"- **{claim}**: not resolved (rows missing).")
            continue
        links, texts = [], []
        for hi, lo in zip(specs, specs[1:]):
            a, b = (by_spec[s]["accuracies"] for s in (hi, lo))
            verdict, diff, p = compare([100 * v for v in a], [100 * v for v in b], alpha)
            links.append(verdict)
            texts.append(f"{by_spec[hi]['label']} − {by_spec[lo]['label']} = {diff:+.2f} points ({p_text(p, a, b)}): {verdict}")
        lines.append(f"- **{claim}: {chain_verdict(links)}.** " + "; ".join(texts) + ".")
    duo, plain = by_spec.get("method=binaryduo"), by_spec.get("method=duo_binary")
    if duo and duo.get("coupled") and plain and plain.get("accuracies"):
        a, b = duo["coupled"], plain["accuracies"]
        verdict, diff, p = compare([100 * v for v in a], [100 * v for v in b], alpha)
        lines.append(
            f"- At equal epochs (BinaryDuo's coupled ternary network before fine-tuning, which the "
            f"decoupled network equals exactly): coupled − {plain['label']} = {diff:+.2f} points "
            f"({p_text(p, a, b)}): {verdict}."
        )
    sb = by_spec.get("method=sb")
    if sb and sb.get("agreements"):
        agree = sb["agreements"]
        verdict = "reproduced" if all(a == 1.0 for a in agree) else "not reproduced"
        lines.append(
            f"- **Self-Binarizing: the deployed sign + BinaryBN network is the trained one (Lahoud & Achanta "
            f"2019): {verdict}.** Test: its predictions equal the trained network's (tanh at nu_max) on all "
            f"10,000 test images, on every seed; agreement {min(agree) * 100:.2f}% at worst over "
            f"{len(agree)} seed(s)."
        )
    return lines


def _machine_line(wall: float, where: str | None = None) -> str:
    """Where the runs ran (``where``, or this process: CPU, cores it may use, XLA
    threading flags) and their total wall time."""
    if where is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        pinned = f", runs pinned to core(s) {','.join(map(str, cores))}" if cores and len(cores) < os.cpu_count() else ""
        xla = os.environ.get("XLA_FLAGS")
        where = (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{pinned}"
            f"{f' (XLA_FLAGS={xla})' if xla else ''}, CPU only; {time.strftime('%Y-%m-%d')}"
        )
    return f"{where}; total wall time of this table's runs {wall / 60:.0f} min."


def _recorded_machine(path: str, arch: str) -> str | None:
    """The machine line a table's block already states, without its wall time: a
    ``--table-only`` rewrite describes where the runs ran, not where it is itself run."""
    if not os.path.exists(path):
        return None
    block = open(path).read().partition(f"<!-- results:{arch} -->")[2].partition(f"<!-- /results:{arch} -->")[0]
    lines = [line for line in block.splitlines() if line.startswith("Machine: ")]
    return lines[-1].partition("; total wall time")[0] if lines else None


def write_table(
    path: str, arch: str, epochs: int, seeds: int, rows: list[dict], wall: float, where: str | None = None
) -> None:
    fp = next((r for r in rows if r["spec"] == "method=fp" and r["accuracies"]), None)
    fp_mean = statistics.fmean(fp["accuracies"]) if fp else None
    complete = all(len(r["accuracies"]) == seeds for r in rows)
    seeds_text = f"{seeds} seed(s) each" if complete else f"of {seeds} planned seeds, n finished per row as shown (partial)"
    arch_text = {"mlp": "MLP 784-512-512-512-10 (`bnn_mlp`, widths 512)", "cnn": "CNN 32-32-64-64 (`cnn_small`)"}[arch]
    finetune = max(1, round(epochs / 3))
    lines = [
        f"## Fashion-MNIST, {arch_text}",
        "",
        f"Same budget for every method: {epochs} epochs, batch 128, Adam 1e-3 with cosine decay, "
        f"{seeds_text}; first layer and classifier full precision. BinaryDuo trains its coupled ternary "
        f"network for the same {epochs} epochs, then fine-tunes the decoupled network for {finetune} more "
        "(its paper's procedure). Test accuracy on the 10,000 test images: mean ± half-width of the 95% "
        "t-interval over seeds. Binary ops: 1-bit products per image of the deployed network "
        "(`binax.summary`'s binary MACs times their planes; ABC-Net M·N). Train time: mean over "
        "the runs that were not interrupted and resumed.",
        "",
        "| method | test accuracy (%) | gap to FP (points) | binary ops | packed size | float32 size | train time / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["accuracies"]:
            continue
        mean, half = t_interval([100 * a for a in r["accuracies"]])
        gap = "—" if fp_mean is None or r["spec"] == "method=fp" else f"{mean - 100 * fp_mean:+.2f}"
        t = f"{statistics.fmean(r['times']):.0f} s" if r["times"] else "—"
        interval = "" if math.isnan(half) else f" ± {half:.2f}"
        ops = f"{r['binary_ops'] / 1e6:.3f} M" if r["binary_ops"] else "0"
        lines.append(
            f"| {r['label']} | {mean:.2f}{interval} (n={len(r['accuracies'])}) | {gap} | "
            f"{ops} | {r['packed'] / 1024:.0f} KiB | {r['float32'] / 1024:.0f} KiB | {t} |"
        )
    for r in rows:
        if r.get("extra"):
            lines += ["", f"{r['label']}: " + "; ".join(r["extra"])]
    lines += ["", *verdict_lines(rows), "", _machine_line(wall, where)]
    text = "\n".join(lines) + "\n"
    begin, end = f"<!-- results:{arch} -->", f"<!-- /results:{arch} -->"
    old = open(path).read() if os.path.exists(path) else "# Results\n\n"
    if begin in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        new = f"{head}{begin}\n{text}{end}{tail}"
    else:
        new = f"{old.rstrip()}\n\n{begin}\n{text}{end}\n"
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mlp", choices=("mlp", "cnn"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--methods", default="", help="comma-separated recipe methods (default: all rows)")
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "results"))
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--quick", action="store_true", help="tiny runs (pipeline check, not results)")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from finished runs; train nothing")
    args = parser.parse_args()

    wanted = set(filter(None, args.methods.split(",")))
    known = {_method(spec) for _, spec in SWEEP}
    if wanted - known:
        parser.error(f"--methods: unknown {sorted(wanted - known)}; the table's methods are {sorted(known)}")
    rows = []
    wall = 0.0
    for label, spec in SWEEP:
        packed, float32, binary_ops = deployed_cost(args.arch, spec)
        run = not args.table_only and (not wanted or _method(spec) in wanted)
        rows.append(dict(label=label, spec=spec, run=run, accuracies=[], times=[], packed=packed, float32=float32,
                         binary_ops=binary_ops, extra=[], agreements=[], coupled=[]))
    # Seed-major order: the first pass gives a whole (one-seed) table early. Rows left out
    # by --methods keep their finished runs in the table (they are read, not trained).
    for seed in range(args.seeds):
        for row in rows:
            if row["run"]:
                summary = run_one(args.arch, row["spec"], seed, args.epochs, args.root, args.quick)
                print(json.dumps({"arch": args.arch, "spec": row["spec"], "seed": seed, **summary}), flush=True)
            else:
                summary = _finished(_run_dir(args.root, args.arch, row["spec"], seed))
                if summary is None:
                    continue
            wall += summary.get("wall_time_s") or 0.0
            _add_run(row, seed, summary)
            if row["run"]:
                write_table(args.output, args.arch, args.epochs, args.seeds, rows, wall)
    where = _recorded_machine(args.output, args.arch) if args.table_only else None
    write_table(args.output, args.arch, args.epochs, args.seeds, rows, wall, where)


def _add_run(row: dict, seed: int, summary: dict) -> None:
    """Add one finished run's accuracy, time and recipe-specific checks to its table row."""
    row["accuracies"].append(summary["test_accuracy"])
    # A resumed run's summary times only its last process: leave it out of the mean.
    if summary.get("resumed_from_step") is None:
        row["times"].append(summary.get("train_time_s") or summary.get("wall_time_s") or 0.0)
    if "agreement" in summary:
        row["agreements"].append(summary["agreement"])
        row["extra"].append(
            f"seed {seed}: tanh at nu_max {100 * summary['tanh_test_accuracy']:.2f}%, sign + BinaryBN "
            f"{100 * summary['test_accuracy']:.2f}%, prediction agreement {100 * summary['agreement']:.2f}%"
        )
    if "coupled_test_accuracy" in summary:
        row["coupled"].append(summary["coupled_test_accuracy"])
        differing = round(summary.get("decoupling_differing_fraction", 0.0) * 10000)
        rounding = f"; logits moved on {differing} of 10,000 images by float rounding at a threshold" if differing else ""
        row["extra"].append(
            f"seed {seed}: coupled ternary {100 * summary['coupled_test_accuracy']:.2f}%, decoupled "
            f"{100 * summary['decoupled_test_accuracy']:.2f}% (max |logit diff| "
            f"{summary['decoupling_max_logit_diff']:.1e}{rounding}), fine-tuned {100 * summary['test_accuracy']:.2f}%"
        )


if __name__ == "__main__":
    main()
