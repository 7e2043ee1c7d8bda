"""One workdir, one config: a rerun continues the run its workdir holds, or stops.

``workdir/config.json`` is the config a run was started with, written once. A rerun
compares its config with the workdir's (:func:`check`):

* Only keys in :data:`NEUTRAL_KEYS` differ (how often to log, evaluate, report or
  checkpoint, how many checkpoints to keep, where the processes meet): these cannot
  change the trained weights, so the run resumes under the new values.
* Any other key differs: :class:`~binax.errors.ConfigError`, one line listing each
  difference (``key: old -> new``) and the two ways on: a new workdir, or
  ``allow_config_change=True`` (``--allow_config_change``), which resumes under the new
  config and appends the change to ``workdir/config_history.jsonl``. ``config.json`` is
  never rewritten; the config in force is ``config.json`` with the history's changes
  applied in order (:func:`current_config`), which ``restore_variables`` reads.
* The workdir holds a finished run (``final.json`` names its final checkpoint) and the
  config asks for no more epochs: nothing to do. The caller reports it and returns
  ``final.json`` without training or writing anything.
"""

from __future__ import annotations

import datetime
import json
import os

import ml_collections
from flax import traverse_util

from binax import files
from binax.errors import ConfigError, WorkdirError
from binax.train.metrics import flatten

__all__ = [
    "CONFIG_NAME",
    "HISTORY_NAME",
    "FINAL_NAME",
    "NEUTRAL_KEYS",
    "differences",
    "current_config",
    "read_final",
    "Plan",
    "check",
    "record",
]

CONFIG_NAME = "config.json"
HISTORY_NAME = "config_history.jsonl"
FINAL_NAME = "final.json"

#: Keys that may differ between the runs of one workdir: none changes the trained weights
#: (a resumed run repeats an uninterrupted one bit for bit whatever they are). Prefixes end
#: with a dot.
NEUTRAL_KEYS = (
    "log_every_steps",
    "report_every_seconds",
    "eval_every_epochs",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.async_save",
    "distributed.",
)

_SHOWN = 8  # differences listed in the error before "... and N more"


def _neutral(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in NEUTRAL_KEYS)


def as_json(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as the JSON tree ``config.json`` holds (tuples as lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def differences(old: dict, new: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(result_changing, neutral)``: ``{key: (old, new)}`` for every differing leaf of two
    JSON config trees (a key missing on one side is ``None`` there)."""
    a, b = flatten(old), flatten(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    neutral = {k: v for k, v in changed.items() if _neutral(k)}
    return {k: v for k, v in changed.items() if k not in neutral}, neutral


def current_config(workdir: str) -> dict | None:
    """``config.json`` with the changes of ``config_history.jsonl`` applied in order (the
    config the workdir's run is under now), or None when the workdir has no config.json."""
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    config = files.read_json(path, "the config this workdir's run was started with")
    history = os.path.join(workdir, HISTORY_NAME)
    if os.path.exists(history):
        with open(history) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                changes = entry["changes"]
            except (ValueError, KeyError, TypeError):
                raise WorkdirError(
                    f"{history} line {number} is damaged; it records a config change of this workdir's run"
                ) from None
            # Empty dicts (a binarizer's kwargs {}) stay in the tree; a change fills them.
            flat = traverse_util.flatten_dict(config, keep_empty_nodes=True, sep=".")
            flat.update({key: new for key, (_, new) in changes.items()})
            config = traverse_util.unflatten_dict(flat, sep=".")
    return config


def read_final(workdir: str) -> dict | None:
    """``final.json`` of a finished run (one whose final checkpoint was written), else None."""
    path = os.path.join(workdir, FINAL_NAME)
    if not os.path.exists(path):
        return None
    final = files.read_json(path, "the result of this workdir's run")
    return final if isinstance(final, dict) and final.get("final_checkpoint") is not None else None


def _describe(changes: dict[str, tuple]) -> str:
    items = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items()]
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" ... and {more} more" if more > 0 else "")


class Plan:
    """What :func:`check` found: ``finished`` (final.json of a finished run, or None), the
    ``changes`` to record (result-changing, allowed by the flag) and the ``neutral`` ones."""

    def __init__(self, new: dict, saved: dict | None, changes: dict, neutral: dict, finished: dict | None):
        self.new, self.saved, self.changes, self.neutral, self.finished = new, saved, changes, neutral, finished


def check(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> Plan:
    """Compares ``config`` with the one ``workdir`` holds; reads only.

    Raises :class:`~binax.errors.ConfigError` when a key outside :data:`NEUTRAL_KEYS`
    differs and ``allow_config_change`` is False.
    """
    new = as_json(config)
    saved = current_config(workdir)
    if saved is None:
        return Plan(new, None, {}, {}, None)
    changes, neutral = differences(saved, new)
    if changes and not allow_config_change:
        raise ConfigError(
            f"workdir {workdir} holds a run of another config ({_describe(changes)}). Use a new --workdir, or "
            f"pass --allow_config_change (allow_config_change=True) to continue this run under the new config "
            f"(recorded in {os.path.join(workdir, HISTORY_NAME)}; {CONFIG_NAME} keeps the original)."
        )
    final = read_final(workdir)
    # A finished run that is not asked for more epochs has nothing left to train.
    finished = final if final is not None and final.get("epochs") == new.get("num_epochs") else None
    return Plan(new, saved, changes, neutral, finished)


def record(plan: Plan, workdir: str, *, resume_step: int | None) -> None:
    """Writes ``config.json`` for a new run, or appends the allowed changes to the history."""
    if plan.saved is None:
        files.write_json(os.path.join(workdir, CONFIG_NAME), plan.new, sort_keys=True)
        return
    if not plan.changes:
        return
    entry = {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "resumed_from_step": resume_step,
        "changes": {k: list(v) for k, v in {**plan.changes, **plan.neutral}.items()},
    }
    files.append_line(os.path.join(workdir, HISTORY_NAME), json.dumps(entry, sort_keys=True))
