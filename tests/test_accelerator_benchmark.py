"""``python -m benchmarks.accelerator --quick`` runs on the CPU and prints every record with sane
values, so the one-command device benchmark cannot rot between accelerator runs.

float32 only, to keep the suite's budget: compiling each network again in bfloat16 would
double the test's time; the bfloat16 step's lowering is tests/test_lowering.py's."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerator_quick_prints_every_record():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.accelerator", "--quick", "--dtypes", "float32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["benchmark"], []).append(r)
    assert set(by_kind) == {"device", "train_step", "binary_vs_float", "packed_inference", "host_pipeline"}
    assert by_kind["device"][0]["platform"] == "cpu" and by_kind["device"][0]["device_count"] >= 1

    steps = {(r["network"], r["compute_dtype"]): r for r in by_kind["train_step"]}
    networks = ("resnet18_irnet", "resnet18_float", "vgg_small")
    assert set(steps) == {(n, "float32") for n in networks}
    for r in steps.values():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["compile_s"] > 0
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["images_per_s"] == pytest.approx(1000 * r["batch_size"] / r["step_ms"], rel=0.01)
    assert steps[("resnet18_irnet", "float32")]["image_shape"][2] == 3
    assert steps[("vgg_small", "float32")]["image_shape"] == [32, 32, 3]

    ratios = {r["compute_dtype"]: r for r in by_kind["binary_vs_float"]}
    for dtype, r in ratios.items():
        want = steps[("resnet18_irnet", dtype)]["step_ms"] / steps[("resnet18_float", dtype)]["step_ms"]
        assert r["binary_step_over_float_step"] == pytest.approx(want, rel=1e-3)

    packed = by_kind["packed_inference"][0]
    assert packed["model"] == "vgg_small" and packed["runtime"] == "chain" and packed["images_per_s"] > 0
    # The packed network predicts what the eval graph predicts (a tie within float
    # rounding may flip one of the few checked images).
    assert packed["prediction_agreement"] >= 0.75
    assert packed["predictions_equal"] == (packed["prediction_agreement"] == 1.0)

    pipeline = by_kind["host_pipeline"][0]
    assert pipeline["images_per_s"] > 0 and pipeline["steps"] > 0
