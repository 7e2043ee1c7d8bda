"""Data parallelism gives the single-device answer: 8 simulated CPU devices in one process,
and two processes joined by ``jax.distributed`` on localhost, train the same 5 steps as
one device, to float tolerance. Each run is a subprocess because the device count is
fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from binax.train import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs configs/digits_mlp.py with flattened overrides (argv[1], JSON) in argv[2].
WORKER = r"""
import json, sys
from configs import digits_mlp
from binax import train
overrides, workdir = json.loads(sys.argv[1]), sys.argv[2]
config = digits_mlp.get_config()
for key, value in overrides.items():
    config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
train.train_and_evaluate(config, workdir)
"""

# 1500 digits / 296 = 5 steps; 296 splits evenly over 8 devices and over 2 processes.
OVERRIDES = {
    "model.widths": [32, 32],
    "num_epochs": 1,
    "batch_size": 296,
    "eval_batch_size": 296,
    "log_every_steps": 1,
    "progress_unit": "step",
    "checkpoint.async_save": False,
}


def start(workdir, devices=1, overrides=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    args = json.dumps({**OVERRIDES, **(overrides or {})})
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, args, str(workdir)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"worker timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def train_losses(workdir):
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [r["train/loss"] for r in records if "train/loss" in r], records


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    finish(start(workdir))
    return train_losses(str(workdir))


@pytest.mark.slow
def test_eight_devices_match_one_device(one_device, tmp_path):
    finish(start(tmp_path, devices=8))
    losses, records = train_losses(str(tmp_path))
    ref_losses, ref_records = one_device
    assert len(ref_losses) == 5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    with open(tmp_path / "final.json") as f:
        assert json.load(f)["devices"] == 8
    ref_eval = [r for r in ref_records if "test/accuracy" in r][-1]
    eval8 = [r for r in records if "test/accuracy" in r][-1]
    assert eval8["test/accuracy"] == pytest.approx(ref_eval["test/accuracy"], abs=1 / 297 + 1e-9)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(one_device, tmp_path):
    address = f"localhost:{free_port()}"
    procs = [
        start(
            tmp_path,
            overrides={
                "distributed.num_processes": 2,
                "distributed.process_id": i,
                "distributed.coordinator_address": address,
            },
        )
        for i in range(2)
    ]
    outs = [finish(p) for p in procs]
    losses, _ = train_losses(str(tmp_path))
    assert len(losses) == 5, outs[0][-2000:]
    np.testing.assert_allclose(losses, one_device[0], rtol=1e-5)
    with open(tmp_path / "final.json") as f:
        summary = json.load(f)
    assert (summary["processes"], summary["devices"]) == (2, 2)
