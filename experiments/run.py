"""Train and evaluate one config: ``python -m experiments.run --config configs/x.py --workdir DIR``.

``--config configs/x.py:quick`` passes ``'quick'`` to the file's ``get_config``;
``--config.optimizer.learning_rate=0.01`` overrides one key (the config is locked, so a
misspelt key is an error). Without ``--config`` this trains ``configs/default.py``; without
``--workdir`` it uses ``runs/<config file name>[_<arg>]``. A workdir that holds checkpoints
is resumed under the config it was started with: another config stops with the list of
differences unless ``--allow_config_change``; a finished run is reported, not retrained.
"""

import ast
import importlib.util
import os
import re
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "default.py")

# glibc malloc keeping freed memory: XLA:CPU's per-step buffers are reused instead of
# mmapped and page-faulted afresh every step (docs/performance.md).
RETAIN_MALLOC = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    default=None,  # DEFAULT_CONFIG, inserted by _parse_flags (a default here is parsed at import)
    help_string=f"Training config file (get_config(arg)), optionally with ':arg'; default {DEFAULT_CONFIG}.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the final summary (resumed if it exists)."
)
_IMPORT = flags.DEFINE_multi_string(
    "import",
    [],
    "Python module(s) to import before the config is used, e.g. one that registers a binarizer "
    "with binax.binarizers.register (repeatable; 'a,b' also works).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Continue the run in --workdir under a config that differs from the one it was started with; "
    "the change is appended to WORKDIR/config_history.jsonl (config.json keeps the original).",
)
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the traceback of an error in the config, data or workdir (a bug's is always shown)."
)


def default_workdir(config_path: str) -> str:
    """``runs/<file stem>[_<arg>]`` under the current directory (as any command's
    relative output path; the run prints where it is)."""
    path, _, arg = config_path.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    suffix = "_" + "".join(ch if ch.isalnum() else "_" for ch in arg) if arg else ""
    return os.path.abspath(os.path.join("runs", stem + suffix))


def _load_config(argv: list[str]) -> ml_collections.ConfigDict:
    """The config ``--config`` names, loaded without overrides (for error messages)."""
    value = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    path, _, config_arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg or None)


def _bad_override(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=`` flag whose key is not in the config, with the valid keys."""
    config = _load_config(argv)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node, seen = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                return f"--config.{key}: config.{'.'.join(seen)} is a {type(node).__name__}, not a group of keys"
            if part not in node:
                where = "config." + ".".join(seen) if seen else "config"
                if not node.keys():
                    return (
                        f"--config.{key}: {where} has no keys in this config, so a flag cannot set {part!r} "
                        "(set the group in a config file)"
                    )
                return f"--config.{key}: {where} has no key {part!r}; valid keys: {', '.join(sorted(node.keys()))}"
            node, seen = node[part], seen + [part]
    return None


def _scalar_for_sequence(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=v`` whose key holds a sequence but whose value is a
    single item: ml_collections would turn ``widths=512`` into ``(512,)``, a different network."""
    config = _load_config(argv)
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        key, text = arg[len("--config."):].split("=", 1)
        node = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                node = None
                break
            node = node[part]
        if not isinstance(node, (tuple, list)):
            continue
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if not isinstance(value, (tuple, list)):
            return (
                f"--config.{key}={text}: config.{key} is a sequence (now {tuple(node)}); write one as "
                f"'({text},)' for one item or '({text}, {text})' for two"
            )
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a one-line error instead of a traceback for a bad config key."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value
        if not isinstance(config, ml_collections.ConfigDict):
            config.get("seed")  # a file that failed to load raises its error here
        message = _scalar_for_sequence(argv)
        if message:
            sys.exit(f"error: {message}")
        return rest
    except OSError as e:
        sys.exit(f"error: {e}")
    except flags.Error as e:
        # A config file that fails to load puts its whole traceback in the message; the
        # last line says what went wrong.
        lines = [line for line in str(e).splitlines() if line.strip()]
        last = lines[-1] if lines else str(e)
        # The config file refused its argument (a BinaxError): its message is the line to show.
        user_error = re.match(r"^binax\.errors\.\w+: (.*)$", last)
        if user_error:
            sys.exit(f"error: {user_error.group(1)}")
        sys.exit(f"error: {last}\nPass --help for the flags.")
    except (AttributeError, KeyError) as e:
        try:
            message = _bad_override(argv)
        except Exception:  # noqa: BLE001 - the original error is the better message then
            message = None
        sys.exit(f"error: {message or e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from binax import binarizers, recipes, train
    from binax.errors import BinaxError

    train.quiet_checkpoint_logs()
    if sys.platform.startswith("linux") and "GLIBC_TUNABLES" not in os.environ:
        logging.info(
            "CPU steps run ~15%% faster with GLIBC_TUNABLES=%s set before starting Python "
            "(`bash dev.sh run` sets it; docs/performance.md).",
            RETAIN_MALLOC,
        )
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
    if not _WORKDIR.value:
        print(f"workdir: {workdir} (no --workdir given: runs/<config> under the current directory)",
              file=sys.stderr, flush=True)
    try:
        binarizers.import_plugins(_IMPORT.value)
        # A plain config is one training run; a recipe config may have stages (BinaryDuo's
        # couple -> decouple -> fine-tune, Self-Binarizing's sign + BinaryBN evaluation).
        recipes.run(_CONFIG.value, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except KeyboardInterrupt as e:
        # The loop saved a checkpoint first (see its log); rerunning resumes from it. The
        # shell's status for the signal: 130 for Ctrl-C, 143 for SIGTERM.
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    except BinaxError as e:
        # The user's config, data or workdir: the message says what to change; a traceback
        # would bury it. Anything else is a bug and keeps its traceback.
        if _DEBUG.value:
            raise
        logging.flush()
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
