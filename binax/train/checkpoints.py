"""Checkpoints of the whole ``TrainState`` with orbax, keeping the latest few and the best.

One ``orbax.checkpoint.CheckpointManager`` in ``workdir/checkpoints``: a step directory
per save, written asynchronously and renamed into place only when complete, so a run
killed mid-save leaves the previous checkpoints intact. Preserved are the last ``keep``
saves and the one with the best evaluation accuracy (saves made at an evaluation carry
``{'accuracy': ...}`` as orbax metrics).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

__all__ = ["Checkpoints"]

BEST_METRIC = "accuracy"


def _best_metric(metrics) -> float:
    return float(metrics.get(BEST_METRIC, -math.inf))


class Checkpoints:
    """The checkpoints of one run: ``save``, ``latest_step``, ``best_step``, ``restore``."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep}: keep at least the latest checkpoint (>= 1)")
        self.directory = os.path.abspath(directory)
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(n=keep),
                cm.BestN(
                    get_metric_fn=_best_metric,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,
            best_mode="max",
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The saved step with the highest eval accuracy (the latest if none was evaluated)."""
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, accuracy: float | None = None) -> bool:
        """Saves ``state`` as ``step`` (once: a step already on disk is not rewritten)."""
        if step in self.manager.all_steps():
            return False
        # Saves between evaluations carry empty metrics (never the best) rather than none,
        # which orbax would warn about on every save.
        metrics = {} if accuracy is None else {BEST_METRIC: float(accuracy)}
        return self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores ``step`` into the structure, dtypes and shardings of ``abstract_state``
        (a pytree of ``jax.ShapeDtypeStruct`` with ``sharding``)."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def restore_tree(self, step: int) -> Any:
        """Restores ``step`` as saved, as a plain tree of arrays (no target structure needed)."""
        return self.manager.restore(step, args=ocp.args.StandardRestore())

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding) -> Any:
    """``jax.ShapeDtypeStruct`` leaves of ``tree``'s shapes and dtypes, all with ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
