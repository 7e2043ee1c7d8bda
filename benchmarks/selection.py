"""The one rule every recipe choice in docs/recipes.md is made by: the highest mean
VALIDATION accuracy over the seeds run. Test accuracy is printed beside it, never read."""

from __future__ import annotations

import statistics


def choose(results: dict[str, list[dict]]) -> str:
    """The variant with the highest mean validation accuracy (ties: the first listed)."""
    scored = {n: statistics.fmean(r["validation_accuracy"] for r in runs) for n, runs in results.items() if runs}
    return max(scored, key=scored.get)


def summary_lines(results: dict[str, list[dict]]) -> list[dict]:
    """One record per variant (seeds run, mean validation and test accuracy), then the choice."""
    lines = [
        {"variant": name, "n": len(runs),
         "mean_validation_accuracy": statistics.fmean(r["validation_accuracy"] for r in runs),
         "mean_test_accuracy": statistics.fmean(r["test_accuracy"] for r in runs)}
        for name, runs in results.items() if runs
    ]
    return lines + ([{"chosen": choose(results)}] if lines else [])
