"""Training curves of one or several runs: ``python -m experiments.plot WORKDIR [WORKDIR ...]``.

Reads each run's ``metrics.jsonl`` and draws one panel per metric (default: train loss,
test accuracy, flip ratio) against the training step, one line per run, into a PNG
(``--out``; default ``WORKDIR/curves.png`` for one run, ``curves.png`` for several).

    python -m experiments.plot runs/default
    python -m experiments.plot runs/irnet runs/bnn --metrics train/loss,test/accuracy --out cmp.png
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_METRICS = ("train/loss", "test/accuracy", "flip_ratio")


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records that have it."""
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot(workdirs: list[str], out: str, metrics: list[str]) -> str:
    """Draws ``metrics`` of every run in ``workdirs`` into ``out``; returns ``out``.

    Raises ``ConfigError`` for a workdir without records or a metric no run has (the
    message lists the ones there are).
    """
    from binax.errors import ConfigError, MissingDependencyError
    from binax.train import read_metrics

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("plotting needs matplotlib: `pip install 'binax[plot]'`") from None

    runs = {}
    for workdir in workdirs:
        records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        if not records:
            raise ConfigError(f"{workdir} has no metric records (metrics.jsonl); is it a training run's --workdir?")
        runs[workdir] = records
    available = sorted({k for records in runs.values() for r in records for k in r if k != "step"})
    missing = [m for m in metrics if m not in available]
    if missing:
        raise ConfigError(f"no run has the metric(s) {missing}; available: {', '.join(available)}")

    labels = _labels(workdirs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for workdir, records in runs.items():
            steps, values = series(records, metric)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=labels[workdir])
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric.startswith("flip_ratio"):
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _labels(workdirs: list[str]) -> dict[str, str]:
    """Each run's shortest distinguishing name: its directory name, or its path if names repeat."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(names)) == len(names):
        return dict(zip(workdirs, names))
    return {w: os.path.normpath(w) for w in workdirs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # argparse, not absl flags: importing this module (tests, notebooks) defines no global flag.
    parser = argparse.ArgumentParser(prog="python -m experiments.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="training runs' --workdir")
    parser.add_argument("--out", help="PNG file to write (default: WORKDIR/curves.png, or curves.png for several runs)")
    parser.add_argument(
        "--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric record keys, one panel each"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error in the arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or (os.path.join(args.workdirs[0], "curves.png") if len(args.workdirs) == 1 else "curves.png")
    from binax.errors import BinaxError

    try:
        print(plot(args.workdirs, out, [m for m in args.metrics.split(",") if m]))
    except BinaxError as e:
        if args.debug:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
