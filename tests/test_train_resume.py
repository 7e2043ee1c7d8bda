"""A run stopped mid-epoch, between two metric records, by SIGKILL, SIGTERM or Ctrl-C
(SIGINT) and restarted in its workdir continues bit-exactly: the same metric records,
record for record, as a run never interrupted (on the same machine and device count; see
test_train_distributed.py for what holds across them). And the command line rejects
misspelt config keys."""

import json
import os
import signal
import subprocess
import sys

import pytest

from binax.train import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/digits_mlp.py with flattened overrides (argv[1], JSON), trained in argv[2];
# argv[3] > 0: this process sends itself signal argv[4] right after that step.
WORKER = r"""
import json, os, signal, sys
from configs import digits_mlp
from binax import train
overrides, workdir, stop_at, signum = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = digits_mlp.get_config()
for key, value in overrides.items():
    config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
def stop(step, state, metrics):
    if metrics is not None and step == stop_at:  # None: the start, before any update
        os.kill(os.getpid(), signum)
try:
    train.train_and_evaluate(config, workdir, hooks=[stop])
except KeyboardInterrupt:
    sys.exit(130)
"""

# 15 steps per epoch, 2 epochs; records every 4 steps and at each epoch end; checkpoints
# every 6 steps and at step 15; Bop on the binary weights so the optimizer state has two
# groups; per-step progress.
OVERRIDES = {
    "model.widths": [32, 32],
    "num_epochs": 2,
    "batch_size": 100,
    "log_every_steps": 4,
    "progress_unit": "step",
    "checkpoint.every_steps": 6,
    "binary_optimizer.name": "bop",
    "binary_optimizer.threshold": 1e-6,
    "binary_optimizer.gamma": 1e-3,
}
STOP_AT = 22  # between the records of steps 20 and 24, after the checkpoint of step 18


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def worker(workdir, stop_at=0, signum=signal.SIGKILL):
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(OVERRIDES), str(workdir), str(stop_at), str(int(signum))],
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    ref = worker(ref_dir)
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out[-3000:]
    records = deterministic(read_metrics(str(ref_dir / "metrics.jsonl")))
    assert [r["step"] for r in records if "train/loss" in r] == [4, 8, 12, 15, 16, 20, 24, 28, 30]
    return records


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, exit_code, resumes_from",
    [
        # From the last checkpoint: 18, or 15 if the asynchronous save of 18 was not
        # finished when the process died.
        (signal.SIGKILL, -signal.SIGKILL, {15, 18}),
        (signal.SIGTERM, 130, {STOP_AT}),  # the loop saves the step it stopped at
        (signal.SIGINT, 130, {STOP_AT}),
    ],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_a_stopped_run_resumes_to_the_uninterrupted_records(uninterrupted, tmp_path, signum, exit_code, resumes_from):
    run_dir = tmp_path / "stopped"
    stopped = worker(run_dir, stop_at=STOP_AT, signum=signum)
    out, _ = stopped.communicate(timeout=240)
    assert stopped.returncode == exit_code, out[-3000:]
    assert not (run_dir / "final.json").exists()
    assert max(r["step"] for r in read_metrics(str(run_dir / "metrics.jsonl"))) == 20

    config = os.path.join(ROOT, "configs", "digits_mlp.py")
    resumed = cli(f"--config={config}", f"--workdir={run_dir}", *(flag(k, v) for k, v in OVERRIDES.items()))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run_dir / "final.json") as f:
        assert json.load(f)["resumed_from_step"] in resumes_from
    # Bit-exact, floats compared with ==; the record at step 24 averages steps 21-24
    # although the run stopped after step 22.
    assert deterministic(read_metrics(str(run_dir / "metrics.jsonl"))) == uninterrupted


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
