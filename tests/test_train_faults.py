"""What a run does when something around it goes wrong: damaged checkpoints, a second run
on the same workdir, a full disk, a damaged data file, a metrics file with a stray line,
and mistakes on the command line. Each case says what the user sees and what is kept."""

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import binax.data
from binax import train
from binax.errors import CheckpointError, ConfigError, DataError, DiskFullError, WorkdirBusyError
from binax.train import checkpoints as ckpt_lib
from configs import digits_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits_mlp.py")


def small_config(**flat):
    """15 steps per epoch, 2 epochs; records every 4 steps, checkpoints every 4 steps."""
    c = digits_mlp.get_config()
    c.model.widths = (32, 32)
    c.num_epochs = 2
    c.log_every_steps = 4
    c.checkpoint.every_steps = 4
    c.checkpoint.async_save = False
    for key, value in flat.items():
        c.update_from_flattened_dict({key: value})
    return c


def deterministic(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in records]


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def cli(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 30-step run: its workdir and its metric records."""
    workdir = tmp_path_factory.mktemp("finished")
    train.train_and_evaluate(small_config(), str(workdir))
    return workdir, deterministic(train.read_metrics(str(workdir / "metrics.jsonl")))


def copy_of(finished_run, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished_run[0], workdir)
    return workdir


# ------------------------------------------------------------------ damaged checkpoints


def _files(step_dir):
    return [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names]


def _largest(step_dir):
    return max(_files(step_dir), key=os.path.getsize)


def random_bytes(step_dir):
    path = _largest(step_dir)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(np.random.default_rng(0).bytes(min(4096, size // 2)))


def truncate(step_dir):
    path = _largest(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def remove_array_metadata(step_dir):
    os.remove(os.path.join(step_dir, "default", "_METADATA"))


def empty_the_step_directory(step_dir):
    for name in os.listdir(step_dir):
        path = os.path.join(step_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def remove_integrity_record(step_dir):
    os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))


DAMAGES = [random_bytes, truncate, remove_array_metadata, empty_the_step_directory, remove_integrity_record]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_a_damaged_newest_checkpoint_is_reported_and_the_run_resumes_from_the_previous(
    finished_run, tmp_path, damage, caplog
):
    workdir = copy_of(finished_run, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    steps = ckpt_lib.Checkpoints(str(ckpt_dir)).all_steps()
    newest, previous = steps[-1], steps[-2]
    damage(str(ckpt_dir / str(newest)))

    summary = train.train_and_evaluate(small_config(), str(workdir))

    assert summary["resumed_from_step"] == previous
    assert f"checkpoint step {newest} in {ckpt_dir / str(newest)} is damaged" in caplog.text
    moved = os.listdir(str(ckpt_dir) + ".damaged")
    assert [name.split("-")[0] for name in moved] == [str(newest)]
    # The steps after the intact checkpoint were trained again: the same records as before.
    assert deterministic(train.read_metrics(str(workdir / "metrics.jsonl"))) == finished_run[1]


@pytest.mark.slow
def test_no_intact_checkpoint_stops_with_one_reason_per_step_and_moves_nothing(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    ckpt_dir = workdir / "checkpoints"
    steps = ckpt_lib.Checkpoints(str(ckpt_dir)).all_steps()
    for step in steps:
        random_bytes(str(ckpt_dir / str(step)))
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints \(step 30: .*; step 28: "):
        train.train_and_evaluate(small_config(), str(workdir))
    assert ckpt_lib.Checkpoints(str(ckpt_dir)).all_steps() == steps
    assert not os.path.exists(str(ckpt_dir) + ".damaged")


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_not_mistaken_for_damage(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    other = small_config(**{"model.widths": (32, 16), "num_epochs": 3})  # 3: more to train
    with pytest.raises(ConfigError, match=r"holds a run of another config \(model.widths: \[32, 32\] -> \[32, 16\], num_epochs: 2 -> 3\)"):
        train.train_and_evaluate(other, str(workdir))
    # Allowed to change, the checkpoint still cannot hold the new shapes: that is said, not
    # taken for damage, and the refused change is not recorded.
    with pytest.raises(CheckpointError, match=r"different model or optimizer state .*\(32,\) saved, \(16,\) now"):
        train.train_and_evaluate(other, str(workdir), allow_config_change=True)
    assert not os.path.exists(str(workdir / "checkpoints") + ".damaged")
    assert not (workdir / "config_history.jsonl").exists()


@pytest.mark.slow
def test_restore_variables_names_a_damaged_checkpoint_and_the_intact_ones(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    steps = ckpt_lib.Checkpoints(str(workdir / "checkpoints")).all_steps()
    random_bytes(str(workdir / "checkpoints" / str(steps[-1])))
    with pytest.raises(CheckpointError, match=rf"step {steps[-1]} .* is damaged: .*Other saved steps: \[{steps[0]}"):
        train.restore_variables(str(workdir), "latest")
    model, variables, _, step = train.restore_variables(str(workdir), steps[-2])
    assert step == steps[-2] and "latent_kernel" in variables["params"]["fc1"]


# ------------------------------------------------------------------ one run per workdir


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_at_once_naming_the_first(tmp_path):
    workdir = tmp_path / "w"
    first = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--config={DIGITS}", f"--workdir={workdir}",
         "--config.num_epochs=1000"],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        lock = workdir / train.workdir.LOCK_NAME
        deadline = time.monotonic() + 120
        config = workdir / "config.json"
        while not (config.exists() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = cli(f"--config={DIGITS}", f"--workdir={workdir}", "--config.seed=1")
        assert second.returncode == 1
        assert f"workdir {workdir} is in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, its config untouched
        with open(config) as f:
            assert json.load(f)["seed"] == 0
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the lock of the killed run: the next run may start.
    with train.lock_workdir(str(workdir)):
        with pytest.raises(WorkdirBusyError):  # (while it is held, it is held)
            lock_from_another_process(str(workdir))


def lock_from_another_process(workdir):
    code = f"from binax.train import lock_workdir\nwith lock_workdir({workdir!r}): pass"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    if result.returncode:
        raise WorkdirBusyError(result.stderr.strip().splitlines()[-1])


def test_nested_locks_in_one_process_are_one_lock(tmp_path):
    with train.lock_workdir(str(tmp_path)):
        with train.lock_workdir(str(tmp_path / "stage")):  # a recipe's stage in a sub-workdir
            pass
        with train.lock_workdir(str(tmp_path)):
            pass


# ------------------------------------------------------------------ full disk


@pytest.mark.slow
def test_a_full_disk_at_the_last_checkpoint_keeps_the_final_metrics(tmp_path, monkeypatch):
    config = small_config()
    save = ckpt_lib.Checkpoints.save

    def full_at_the_end(self, step, state, **kw):
        if step == 30:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
        return save(self, step, state, **kw)

    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", full_at_the_end)
    with pytest.raises(DiskFullError, match=r"at step 30: the final metrics are in .*final.json; the newest checkpoint is step 28"):
        train.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "final.json") as f:
        final = json.load(f)
    last_eval = [r for r in train.read_metrics(str(tmp_path / "metrics.jsonl")) if "test/accuracy" in r][-1]
    assert (final["step"], final["test_accuracy"], final["final_checkpoint"]) == (30, last_eval["test/accuracy"], None)


# Runs experiments.run; before the last epoch's end, once earlier saves are on disk, fills
# the disk under argv[-1] but for 100 KB: room for the metrics, not for a checkpoint.
FILL_THEN_RUN = r"""
import os, runpy, sys
from binax.train import loop
root = sys.argv.pop()
end_epoch = loop._end_epoch
def filling(run, state, window, epoch, clock):
    if epoch + 1 == run.config.num_epochs:
        run.out.ckpts.wait()
        st = os.statvfs(root)
        with open(os.path.join(root, "filler"), "wb") as f:
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - 100_000, 0))
    return end_epoch(run, state, window, epoch, clock)
loop._end_epoch = filling
sys.argv = ["experiments.run", *sys.argv[1:]]
runpy.run_module("experiments.run", run_name="__main__")
"""


@pytest.mark.slow
def test_a_real_full_disk_is_one_line_and_keeps_the_result(tmp_path):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        workdir = mount / "w"
        result = subprocess.run(
            [sys.executable, "-c", FILL_THEN_RUN, f"--config={DIGITS}", f"--workdir={workdir}",
             "--config.model.widths=(32, 32)", "--config.num_epochs=3", str(mount)],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240,
        )
        assert result.returncode == 1, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: no space left on device while writing {workdir} at step 45: ")
        assert "the final metrics are in" in lines[-1]
        assert "Traceback" not in result.stderr and "Exception" not in result.stderr
        with open(workdir / "final.json") as f:
            assert json.load(f)["step"] == 45
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------ data and metrics files


def test_a_truncated_gzip_idx_file_is_named_in_the_error(tmp_path):
    images = np.zeros((10, 4, 4), np.uint8)
    header = bytes([0, 0, 0x08, 3]) + np.array([10, 4, 4], ">u4").tobytes()
    whole = gzip.compress(header + images.tobytes())
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=rf"{path}: the gzip data is damaged"):
        binax.data.load_idx(str(path))


def test_metric_lines_that_are_not_records_are_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "train/loss": 2.0}\n[1, 2]\n"text"\n{"no_step": 3}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "tr'
    )
    assert train.read_metrics(str(path)) == [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}]
    assert "line 2 is not a metric record" in caplog.text and "line 4 is not a metric record" in caplog.text
    # A resume keeps the records and drops the rest.
    writer = train.MetricsWriter(str(tmp_path), resume_step=2)
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ the command line


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.model.name=bnn_mlpp"], "Unknown model 'bnn_mlpp'; valid names are: "),
        (["--config.data.name=fashion_mnistt"], "unknown dataset 'fashion_mnistt'"),
        (["--config.batch_size=0"], "batch_size=0 must be a positive multiple of the 1 devices"),
        (["--config.data.name=fashion_mnist", "--config.data.data_dir=/nonexistent"],
         "not found in '/nonexistent'. "),
    ],
    ids=["model", "dataset", "batch_size", "missing_data"],
)
def test_user_errors_are_one_line_without_a_traceback(tmp_path, flags, message):
    result = cli(f"--config={DIGITS}", f"--workdir={tmp_path / 'w'}", *flags)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = cli(f"--config={DIGITS}", f"--workdir={tmp_path / 'w'}", "--config.batch_size=0", "--debug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ConfigError: batch_size=0" in result.stderr
