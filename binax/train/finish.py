"""How a run ends: its summary (``final.json``), the line it prints, a finished workdir
found again, and a full disk turned into the one error that says what was kept."""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Mapping

import jax
import ml_collections
from absl import logging

from binax import files
from binax.errors import DiskFullError
from binax.train import checkpoints as ckpt_lib
from binax.train import evaluation as evaluation_lib
from binax.train import metrics as metrics_lib
from binax.train import workdir_config
from binax.train.records import top5_text

__all__ = [
    "summary",
    "write_final",
    "print_final",
    "report_finished",
    "final_checkpoint_intact",
    "is_disk_full",
    "disk_full_error",
    "quietly",
]


def summary(
    config: ml_collections.ConfigDict,
    evaluation: Mapping[str, float],
    *,
    step: int,
    best_step: int | None,
    final_checkpoint: int | None,
    resume_step: int | None,
    wall_time_s: float,
    train_time_s: float,
) -> dict[str, Any]:
    """What ``final.json`` holds: the last evaluation (``test/...`` metrics) and the run's
    facts. A further evaluation (another split, another metric) adds its keys here."""
    return {
        "test_accuracy": evaluation["test/accuracy"],
        "test_loss": evaluation["test/loss"],
        **evaluation_lib.validation_summary(evaluation),
        **({"test_top5_accuracy": evaluation["test/top5_accuracy"]} if "test/top5_accuracy" in evaluation else {}),
        "step": step,
        "epochs": config.num_epochs,
        "best_step": best_step,
        "final_checkpoint": final_checkpoint,
        "resumed_from_step": resume_step,
        "wall_time_s": wall_time_s,
        "train_time_s": train_time_s,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "model": config.model.name,
        "dataset": config.data.name,
    }


def write_final(workdir: str, final: Mapping[str, Any]) -> None:
    """Writes ``workdir/final.json`` (atomically)."""
    files.write_json(os.path.join(workdir, workdir_config.FINAL_NAME), final)


def print_final(workdir: str, final: Mapping[str, Any]) -> None:
    """The run's last line: accuracy, steps, wall time, workdir."""
    wall = final["wall_time_s"]
    resumed = final["resumed_from_step"]
    print(
        f"final: test accuracy {100 * final['test_accuracy']:.2f}%"
        f"{top5_text(final.get('test_top5_accuracy'))}"
        f"{evaluation_lib.validation_text(final.get('validation_accuracy'))} (loss {final['test_loss']:.4f}) "
        f"after {final['epochs']} epochs / {final['step']} steps; wall time "
        f"{metrics_lib.format_duration(wall)} ({wall:.0f} s"
        f"{'' if resumed is None else f', this run, resumed from step {resumed}'}); "
        f"workdir {workdir}",
        flush=True,
    )


def report_finished(workdir: str, final: Mapping[str, Any]) -> None:
    """Says that ``workdir`` holds a finished run and nothing was done."""
    if jax.process_index() == 0:
        accuracy = final.get("test_accuracy")
        print(
            f"workdir {workdir} holds a finished run (test accuracy "
            f"{'?' if accuracy is None else f'{100 * accuracy:.2f}%'} after {final.get('step')} steps, "
            f"{os.path.join(workdir, workdir_config.FINAL_NAME)}): nothing to train, nothing written. "
            "Use a new --workdir to train again.",
            flush=True,
        )


def final_checkpoint_intact(workdir: str, final: Mapping[str, Any]) -> bool:
    """Whether a finished run's final checkpoint reads back as written. When it does not,
    the run is resumed as usual: from the newest intact checkpoint, damage reported."""
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        ckpts.restore_tree(int(final["final_checkpoint"]))
        return True
    except ckpt_lib.DamagedCheckpoint as e:
        logging.warning("%s; the finished run is resumed from its newest intact checkpoint", e)
        return False
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        logging.warning("the final checkpoint named by %s cannot be read (%r); resuming", workdir, e)
        return False
    finally:
        ckpts.close()


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it came from reports a full disk (ENOSPC, or
    tensorstore's text for it)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(workdir: str, step: int, final_written: bool, ckpts: ckpt_lib.Checkpoints) -> DiskFullError:
    """The one error for a disk that filled up at ``step``: what was kept, where to resume."""
    kept = f"the final metrics are in {os.path.join(workdir, 'final.json')}; " if final_written else ""
    try:
        last = ckpts.latest_step()
    except Exception:  # noqa: BLE001
        last = None
    error = DiskFullError(
        f"no space left on device while writing {workdir} at step {step}: {kept}"
        f"the newest checkpoint is {'step ' + str(last) if last is not None else 'none'}. "
        "Free some space and rerun the same command to resume."
    )
    error.errno = errno.ENOSPC
    return error


def quietly(fn: Callable[[], Any]) -> None:
    """Runs a clean-up while another error propagates: its own failure (often the same
    full disk) is logged, not chained onto the error the user must read."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        logging.debug("clean-up failed too: %r", e)
