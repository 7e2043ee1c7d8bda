"""Reading a trained run back: :func:`restore_variables`."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from binax import quantizer
from binax.errors import CheckpointError, ConfigError
from binax.train import checkpoints as ckpt_lib
from binax.train import workdir_config
from binax.train.trainer import create_model

__all__ = ["restore_variables"]


def restore_variables(
    workdir: str, step: str | int = "best"
) -> tuple[Any, dict[str, Any], ml_collections.ConfigDict, int]:
    """The model, ``{params, batch_stats}``, config and step of a trained run in ``workdir``.

    Reads ``workdir/config.json`` (written by :func:`train_and_evaluate`, with the changes
    of ``config_history.jsonl`` applied) and the
    checkpoint ``step``: ``'best'`` (highest eval accuracy; the latest if none was
    evaluated), ``'latest'`` or a step number. The saved ``TrainState`` is read as a plain
    tree onto this process's first device (whatever devices trained it), so nothing about
    the optimizer or the training mesh is needed; the variables are verified against
    their checksums. Raises :class:`~binax.errors.CheckpointError` for a damaged
    checkpoint, naming the intact steps to pass instead.

    Example::

        model, variables, config, step = binax.train.restore_variables("runs/default")
        logits = model.apply(variables, images, train=False)
    """
    saved = workdir_config.current_config(os.path.abspath(workdir))
    if saved is None:
        path = os.path.join(os.path.abspath(workdir), workdir_config.CONFIG_NAME)
        raise FileNotFoundError(f"no {path}: is {workdir!r} the --workdir of a binax training run?")
    config = ml_collections.ConfigDict(saved)
    # The file is data: a quantizer it names must already be registered here.
    quantizer.check_file_config(config.model, os.path.join(os.path.abspath(workdir), workdir_config.CONFIG_NAME))
    ckpts = ckpt_lib.Checkpoints(os.path.join(os.path.abspath(workdir), "checkpoints"), async_save=False)
    try:
        saved = ckpts.all_steps()
        if not saved:
            raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
        if step == "best":
            chosen = ckpts.best_step()
            chosen = ckpts.latest_step() if chosen is None else chosen
        elif step == "latest":
            chosen = ckpts.latest_step()
        else:
            try:
                chosen = int(step)
            except (TypeError, ValueError):
                raise ConfigError(f"step must be 'best', 'latest' or an integer; got {step!r}.") from None
            if chosen not in saved:
                raise ConfigError(f"no checkpoint at step {chosen}; saved steps: {saved}.")
        try:
            state = ckpts.restore_tree(chosen)
        except ckpt_lib.DamagedCheckpoint as e:
            others = [s for s in saved if s != chosen]
            raise CheckpointError(f"{e}. Other saved steps: {others or 'none'}.") from None
    finally:
        ckpts.close()
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return create_model(config.model), jax.tree.map(jnp.asarray, variables), config, chosen
