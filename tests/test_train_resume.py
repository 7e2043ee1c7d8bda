"""A run killed with SIGKILL mid-epoch and restarted in its workdir continues bit-exactly:
the same per-step losses, flip ratios and evaluations as a run never interrupted. And the
command line rejects misspelt config keys."""

import json
import os
import signal
import subprocess
import sys

import pytest

from binax.train import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/digits_mlp.py with flattened overrides (argv[1], JSON), trained in argv[2];
# argv[3] > 0: SIGKILL this process right after that step.
WORKER = r"""
import json, os, signal, sys
from configs import digits_mlp
from binax import train
overrides, workdir, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
config = digits_mlp.get_config()
for key, value in overrides.items():
    config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
train.train_and_evaluate(config, workdir, on_step=on_step)
"""

# 15 steps per epoch, 2 epochs; checkpoints every 4 steps and at step 15; Bop on the
# binary weights so the optimizer state has two groups; per-step progress.
OVERRIDES = {
    "model.widths": [32, 32],
    "num_epochs": 2,
    "batch_size": 100,
    "log_every_steps": 1,
    "progress_unit": "step",
    "checkpoint.every_steps": 4,
    "binary_optimizer.name": "bop",
    "binary_optimizer.threshold": 1e-6,
    "binary_optimizer.gamma": 1e-3,
}
KILL_AT = 22


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def worker(workdir, kill_at=0):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(OVERRIDES), str(workdir), str(kill_at)],
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def flag(key, value):
    if isinstance(value, list):
        value = "(" + ", ".join(map(str, value)) + ")"
    return f"--config.{key}={value}"


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


def deterministic(records):
    """The records without wall-clock measurements."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_run(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref, killed = worker(ref_dir), worker(run_dir, kill_at=KILL_AT)
    ref_out, _ = ref.communicate(timeout=240)
    killed_out, _ = killed.communicate(timeout=240)
    assert ref.returncode == 0, ref_out[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed_out[-3000:]
    assert not (run_dir / "final.json").exists()
    logged = [r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl"))]
    assert max(logged) == KILL_AT  # the killed run got past its last checkpoint

    config = os.path.join(ROOT, "configs", "digits_mlp.py")
    resumed = cli(f"--config={config}", f"--workdir={run_dir}", *(flag(k, v) for k, v in OVERRIDES.items()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run_dir / "final.json") as f:
        summary = json.load(f)
    # Resumed mid-way through epoch 2, from step 16 or 20 (the save of step 20 may not
    # have been finished when the process died).
    assert 15 < summary["resumed_from_step"] < KILL_AT

    ref_records = deterministic(read_metrics(str(ref_dir / "metrics.jsonl")))
    run_records = deterministic(read_metrics(str(run_dir / "metrics.jsonl")))
    assert [r["step"] for r in ref_records if "train/loss" in r] == list(range(1, 31))
    assert run_records == ref_records  # bit-exact: floats compared with ==


def test_misspelt_config_key_is_rejected_by_the_command_line(tmp_path):
    result = cli(
        f"--config={os.path.join(ROOT, 'configs', 'digits_mlp.py')}",
        f"--workdir={tmp_path / 'w'}",
        "--config.optimizer.lrr=0.1",
    )
    assert result.returncode != 0
    # One line naming the bad key and the valid ones, not a traceback.
    assert "config.optimizer has no key 'lrr'; valid keys: b1" in result.stderr
    assert "learning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()
