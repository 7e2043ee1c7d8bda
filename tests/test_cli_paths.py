"""A command-line run started outside the repository: its default workdir is under the
current directory (and it says so), and jax's probes of absent backends stay out of its log."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_run_from_another_directory_writes_there_and_logs_no_backend_probe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # let jax probe as for a user
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    command = [sys.executable, "-m", "experiments.run", "--config", f"{ROOT / 'configs' / 'digits_mlp.py'}:quick",
               "--config.max_steps_per_epoch=2", "--config.model.widths=(16, 16)"]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    workdir = tmp_path / "runs" / "digits_mlp_quick"
    assert (workdir / "final.json").exists()
    assert f"workdir: {workdir} " in out.stderr  # said before training starts, not only at the end
    assert "Unable to initialize backend" not in out.stderr, [l for l in out.stderr.splitlines() if "backend" in l]
