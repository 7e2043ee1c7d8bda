"""What a workdir holds and promises: one config per workdir (a rerun with another one
stops, or continues only when asked and records it), a finished run left as it is,
files written whole or not at all, checkpoint metadata under checksums, and one line
for every way the file system can refuse a workdir."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from binax import files, train
from binax.errors import ConfigError, DiskFullError, WorkdirError
from binax.train import checkpoints as ckpt_lib
from binax.train import workdir_config
from tests.test_train_faults import DIGITS, ROOT, cli, deterministic, env, small_config

STOP_AT = 10


def config(**flat):
    """30 steps; a record every 5 steps and a checkpoint every 4, so that checkpoints
    carry a non-empty metric window; every checkpoint kept (both evaluations too)."""
    return small_config(**{"log_every_steps": 5, "checkpoint.keep": 20, **flat})


class _Stop(Exception):
    pass


def _stop_at(step, state, metrics):
    if step == STOP_AT:
        raise _Stop


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A finished run of ``config()``: its workdir and records."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train_and_evaluate(config(), str(workdir))
    return workdir, deterministic(train.read_metrics(str(workdir / "metrics.jsonl")))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """``config()`` stopped by an error after step 10 (checkpoints at steps 4 and 8)."""
    workdir = tmp_path_factory.mktemp("stopped")
    with pytest.raises(_Stop):
        train.train_and_evaluate(config(), str(workdir), hooks=[_stop_at])
    return workdir


def copy(src, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(src, dst)
    return dst


def snapshot(workdir):
    """Bytes and modification time of every file outside checkpoints/ and tb/."""
    out = {}
    for name in sorted(os.listdir(workdir)):
        path = workdir / name
        if path.is_file() and name != train.workdir.LOCK_NAME:
            out[name] = (path.read_bytes(), path.stat().st_mtime_ns)
    return out


# ------------------------------------------------------------------ one workdir, one config


def test_a_finished_run_rerun_reports_it_and_changes_nothing(reference, tmp_path, capsys):
    workdir = copy(reference[0], tmp_path)
    before = snapshot(workdir)
    steps = ckpt_lib.Checkpoints(str(workdir / "checkpoints")).all_steps()

    summary = train.train_and_evaluate(config(), str(workdir))

    assert summary == json.loads((workdir / "final.json").read_text())
    assert f"workdir {workdir} holds a finished run" in capsys.readouterr().out
    assert snapshot(workdir) == before
    assert ckpt_lib.Checkpoints(str(workdir / "checkpoints")).all_steps() == steps


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"optimizer.learning_rate": 0.01}, "optimizer.learning_rate: 0.003 -> 0.01"),
        ({"seed": 1, "batch_size": 50}, "batch_size: 100 -> 50, seed: 0 -> 1"),
        ({"model.kernel_quantizer": "xnor_weight", "model.kernel_quantizer_kwargs": {}},
         "model.kernel_quantizer: 'libra_pb' -> 'xnor_weight'"),
    ],
    ids=["learning_rate", "seed_and_batch", "method"],
)
def test_a_rerun_with_another_config_stops_listing_the_differences(reference, tmp_path, change, shown):
    workdir = copy(reference[0], tmp_path)
    before = snapshot(workdir)
    c = config()
    for key, value in change.items():
        if isinstance(value, dict):
            c.model[key.split(".")[-1]] = value
        else:
            c.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError) as raised:
        train.train_and_evaluate(c, str(workdir))
    message = str(raised.value)
    assert "\n" not in message
    assert f"workdir {workdir} holds a run of another config ({shown}" in message
    assert "Use a new --workdir, or pass --allow_config_change" in message
    assert snapshot(workdir) == before


def test_keys_that_cannot_change_the_result_may_change_on_resume(stopped, reference, tmp_path):
    workdir = copy(stopped, tmp_path)
    before = (workdir / "config.json").read_bytes()
    summary = train.train_and_evaluate(config(**{"checkpoint.keep": 3, "eval_every_epochs": 2}), str(workdir))
    assert summary["resumed_from_step"] == 8
    assert (workdir / "config.json").read_bytes() == before
    assert not (workdir / workdir_config.HISTORY_NAME).exists()
    # The trained weights are the reference's: the same training records.
    records = deterministic(train.read_metrics(str(workdir / "metrics.jsonl")))
    assert [r for r in records if "train/loss" in r] == [r for r in reference[1] if "train/loss" in r]


def test_allow_config_change_continues_and_records_the_change(stopped, tmp_path):
    workdir = copy(stopped, tmp_path)
    before = (workdir / "config.json").read_bytes()
    c = config(**{"optimizer.learning_rate": 0.01})

    summary = train.train_and_evaluate(c, str(workdir), allow_config_change=True)

    assert summary["resumed_from_step"] == 8 and summary["step"] == 30
    assert (workdir / "config.json").read_bytes() == before  # the original stays
    [entry] = [json.loads(line) for line in (workdir / workdir_config.HISTORY_NAME).read_text().splitlines()]
    assert entry["changes"] == {"optimizer.learning_rate": [0.003, 0.01]}
    assert entry["resumed_from_step"] == 8
    # The config in force is the changed one: a rerun with it is the finished run, and
    # restore_variables reads it.
    assert train.train_and_evaluate(c, str(workdir)) == summary
    assert train.restore_variables(str(workdir))[2].optimizer.learning_rate == 0.01
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 0.01 -> 0.003"):
        train.train_and_evaluate(config(), str(workdir))


def test_the_config_in_force_applies_the_history_and_a_damaged_history_is_named(tmp_path):
    model = {"input_quantizer_kwargs": {}, "kernel_quantizer_kwargs": {}}
    files.write_json(str(tmp_path / "config.json"), {"seed": 0, "optimizer": {"learning_rate": 0.1}, "model": model})
    history = tmp_path / workdir_config.HISTORY_NAME
    files.append_line(str(history), json.dumps({"changes": {"optimizer.learning_rate": [0.1, 0.2]}}))
    files.append_line(str(history), json.dumps({"changes": {"seed": [0, 1], "model.kernel_quantizer_kwargs.t_min": [None, 0.5]}}))
    # An empty dict (a binarizer without keywords) stays; a change fills one.
    assert workdir_config.current_config(str(tmp_path)) == {
        "seed": 1,
        "optimizer": {"learning_rate": 0.2},
        "model": {"input_quantizer_kwargs": {}, "kernel_quantizer_kwargs": {"t_min": 0.5}},
    }
    history.write_text(history.read_text() + '{"changes": {"se')
    with pytest.raises(WorkdirError, match=rf"^{history} line 3 is damaged"):
        workdir_config.current_config(str(tmp_path))


# ------------------------------------------------------------------ files written whole


def test_a_write_killed_before_its_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.write_json(str(path), {"seed": 0})

    def killed(src, dst):
        raise KeyboardInterrupt  # as a kill between the write and the rename

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(str(path), {"seed": 1})
    assert json.loads(path.read_text()) == {"seed": 0}
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would have made it


def test_a_resumed_run_killed_at_its_start_leaves_its_config_intact(stopped, tmp_path, monkeypatch):
    """The issue's case: a kill just after config.json was opened for writing (truncated)."""
    workdir = copy(stopped, tmp_path)
    before = (workdir / "config.json").read_bytes()
    real_open = open

    def killed_after_opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if os.path.basename(str(file)) == "config.json" and ("w" in mode or "+" in mode):
            f.close()
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr("builtins.open", killed_after_opening)
    try:
        train.train_and_evaluate(config(), str(workdir))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert (workdir / "config.json").read_bytes() == before
    assert train.train_and_evaluate(config(), str(workdir))["resumed_from_step"] is not None


def test_a_new_run_killed_while_writing_its_config_leaves_no_empty_config(tmp_path, monkeypatch):
    fsync = os.fsync

    def killed(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".config.json"):
            raise KeyboardInterrupt
        return fsync(fd)

    monkeypatch.setattr(files.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.json").exists()
    assert not [n for n in os.listdir(tmp_path / "w") if n.endswith(".tmp")]


def test_a_resumed_run_does_not_rewrite_its_config(stopped, tmp_path, monkeypatch):
    workdir = copy(stopped, tmp_path)
    mtime = (workdir / "config.json").stat().st_mtime_ns
    written = []
    write_text = files.write_text
    monkeypatch.setattr(files, "write_text", lambda path, text: (written.append(os.path.basename(path)),
                                                                   write_text(path, text)))
    train.train_and_evaluate(config(), str(workdir))
    assert "config.json" not in written and "final.json" in written
    assert (workdir / "config.json").stat().st_mtime_ns == mtime


def test_a_damaged_config_json_is_one_line_naming_it(stopped, tmp_path):
    workdir = copy(stopped, tmp_path)
    (workdir / "config.json").write_text("")
    with pytest.raises(WorkdirError, match=rf"^{workdir / 'config.json'} is damaged \(not JSON: "):
        train.train_and_evaluate(config(), str(workdir))
    with pytest.raises(WorkdirError, match="config.json is damaged"):
        train.restore_variables(str(workdir))


# ------------------------------------------------------------------ checkpoint metadata


def _flip_digit(path, after):
    """Changes the first digit after the text ``after`` in ``path`` (one byte)."""
    text = path.read_text()
    i = text.index(after) + len(after)
    while not text[i].isdigit():
        i += 1
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def test_a_flipped_digit_in_the_saved_metric_window_is_damage(stopped, reference, tmp_path, caplog):
    workdir = copy(stopped, tmp_path)
    meta = workdir / "checkpoints" / "8" / "_CHECKPOINT_METADATA"
    assert '"window": [{' in meta.read_text()  # steps 6-8, after the record of step 5
    _flip_digit(meta, '"loss": ')

    summary = train.train_and_evaluate(config(), str(workdir))

    assert summary["resumed_from_step"] == 4
    assert f"checkpoint step 8 in {workdir / 'checkpoints' / '8'} is damaged: its metadata" in caplog.text
    assert deterministic(train.read_metrics(str(workdir / "metrics.jsonl"))) == reference[1]


def test_a_flipped_digit_in_the_saved_accuracy_cannot_choose_the_best_step(reference, tmp_path, caplog):
    workdir = copy(reference[0], tmp_path)
    def metrics_file(step):
        return workdir / "checkpoints" / str(step) / "metrics" / "metrics"

    accuracy = {s: json.loads(metrics_file(s).read_text())["accuracy"] for s in (15, 30)}
    best, other = (30, 15) if accuracy[30] >= accuracy[15] else (15, 30)
    assert ckpt_lib.Checkpoints(str(workdir / "checkpoints")).best_step() == best
    # The other evaluation now claims a higher accuracy than the best one.
    metrics_file(other).write_text(json.dumps({"accuracy": accuracy[best] + 0.01}))

    assert ckpt_lib.Checkpoints(str(workdir / "checkpoints")).best_step() == best
    assert f"checkpoint step {other} in {workdir / 'checkpoints' / str(other)} is damaged" in caplog.text
    assert train.restore_variables(str(workdir))[3] == best


# ------------------------------------------------------------------ the file system refuses


def _long_name(tmp_path):
    return tmp_path / ("w" * 300)


def _file(tmp_path):
    (tmp_path / "w").write_text("not a directory")
    return tmp_path / "w"


def _under_a_file(tmp_path):
    (tmp_path / "f").write_text("not a directory")
    return tmp_path / "f" / "w"


def _symlink_loop(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    return tmp_path / "a"


@pytest.mark.parametrize(
    "make, message",
    [
        (_long_name, "a name is too long"),
        (_file, "is a file, not a directory"),
        (_under_a_file, "a part of the path is a file"),
        (_symlink_loop, "loop of symbolic links"),
    ],
    ids=["long_name", "file", "under_a_file", "symlink_loop"],
)
def test_a_workdir_the_file_system_refuses_is_one_line_naming_it(tmp_path, make, message):
    workdir = make(tmp_path)
    with pytest.raises(WorkdirError) as raised:
        train.train_and_evaluate(config(), str(workdir))
    assert message in str(raised.value) and str(workdir) in str(raised.value)
    assert "\n" not in str(raised.value)


# Tests run as root, for whom permission bits do not apply: the refusal of an unreadable or
# read-only directory is injected as the PermissionError / OSError(EROFS) the kernel would raise.
@pytest.mark.parametrize(
    "error, message",
    [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"), (errno.ENOSPC, "no space left on device")],
    ids=["unreadable", "read_only", "full"],
)
@pytest.mark.parametrize("where", ["start", "resume"])
def test_a_refused_write_at_start_or_resume_is_one_line(stopped, tmp_path, monkeypatch, error, message, where):
    workdir = copy(stopped, tmp_path) if where == "resume" else tmp_path / "w"
    name = "metrics.jsonl" if where == "resume" else "config.json"
    write_text = files.write_text

    def refused(path, text):
        if os.path.basename(path) == name:
            raise OSError(error, os.strerror(error), path)
        return write_text(path, text)

    monkeypatch.setattr(files, "write_text", refused)
    with pytest.raises((WorkdirError, DiskFullError)) as raised:
        train.train_and_evaluate(config(), str(workdir))
    assert message in str(raised.value) and str(workdir / name) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_read_only_checkpoint_directory_is_one_line_naming_it(stopped, tmp_path):
    """A real read-only file system: the checkpoints directory bind-mounted read-only."""
    workdir = copy(stopped, tmp_path)
    checkpoints = str(workdir / "checkpoints")
    made = subprocess.run(["mount", "--bind", checkpoints, checkpoints], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot bind-mount here (needs root): {made.stderr.decode().strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", checkpoints], capture_output=True)
        if remounted.returncode:
            pytest.skip(f"cannot remount read-only here: {remounted.stderr.decode().strip()}")
        with pytest.raises(WorkdirError) as raised:
            train.train_and_evaluate(config(), str(workdir))
    finally:
        subprocess.run(["umount", checkpoints], check=False)
    message = str(raised.value)
    assert f"cannot use {checkpoints}" in message and "the file system is read-only" in message
    assert "\n" not in message


def _mount_tmpfs(path, options):
    path.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_read_only_or_full_disk_is_one_line_on_the_command_line(tmp_path):
    """Real refusals: a read-only tmpfs and a full one, through the command line."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    _mount_tmpfs(ro, "ro,size=1m")
    try:
        _mount_tmpfs(full, "size=256k")
        try:
            with open(full / "filler", "wb") as f:
                try:
                    f.write(b"\0" * (1 << 20))
                except OSError:
                    pass
            for workdir, text in [(ro / "w", "the file system is read-only"), (full / "w", "no space left on device")]:
                result = cli(f"--config={DIGITS}", f"--workdir={workdir}")
                assert result.returncode == 1, result.stderr[-2000:]
                last = result.stderr.strip().splitlines()[-1]
                assert last.startswith("error: ") and text in last and str(workdir) in last, result.stderr[-2000:]
                assert "Traceback" not in result.stderr
        finally:
            subprocess.run(["umount", str(full)], check=False)
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.slow
def test_the_command_line_says_one_line_for_workdir_mistakes_and_debug_adds_the_traceback(reference, tmp_path):
    workdir = copy(reference[0], tmp_path)
    changed = cli(f"--config={DIGITS}", f"--workdir={workdir}", "--config.seed=1")
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir {workdir} holds a run of another config ("
    )
    (tmp_path / "file").write_text("")
    debug = cli(f"--config={DIGITS}", f"--workdir={tmp_path / 'file'}", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "WorkdirError" in debug.stderr


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tmp_path):
    workdir = tmp_path / "w"
    run = subprocess.Popen(
        [sys.executable, "-m", "experiments.run", f"--config={DIGITS}", f"--workdir={workdir}",
         "--config.num_epochs=1000", "--config.model.widths=(32, 32)"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text():
            assert run.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "rerun the same command to resume" in out
    assert ckpt_lib.Checkpoints(str(workdir / "checkpoints")).all_steps()
