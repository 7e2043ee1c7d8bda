"""Training: optimizers (optax, Bop), the pure train/eval steps, the sharded loop,
checkpoints and metrics.

``train_and_evaluate(config, workdir, hooks=...)`` is the entry point
(``experiments/run.py`` calls it; a hook ``hook(step, state, metrics)`` sees the state
before the first update and after every one) and ``restore_variables(workdir)`` reads a
trained run back; the pieces are public for notebooks and tests: ``train_step`` is a pure
function of explicit state (``eval_logits`` the eval forward), ``create_optimizer`` builds
optax transformations from a config, ``bop`` is Larq's Bop as an optax
``GradientTransformation``; ``evaluate`` is the one evaluation (eval-mode loss, accuracy,
logits) every part of binax uses.
"""

from binax.train.checkpoints import Checkpoints, DamagedCheckpoint
from binax.train.evaluation import Evaluation, array_batches, evaluate
from binax.train.loop import (
    Hook,
    NonFiniteError,
    NonFiniteLossError,
    Trainer,
    build_trainer,
    create_model,
    make_mesh,
    maybe_initialize_distributed,
    restore_variables,
    train_and_evaluate,
)
from binax.train.metrics import MetricsWriter, ProgressReporter, quiet_checkpoint_logs, read_metrics
from binax.train.optimizers import bop, create_optimizer, default_config as optimizer_config, make_schedule, param_labels
from binax.train.steps import (
    TrainState,
    create_train_state,
    eval_logits,
    progress_at,
    train_step,
    update_flip_ratios,
)
from binax.train.workdir import lock_workdir

__all__ = [
    "Checkpoints",
    "Evaluation",
    "array_batches",
    "evaluate",
    "Hook",
    "MetricsWriter",
    "DamagedCheckpoint",
    "NonFiniteError",
    "NonFiniteLossError",
    "ProgressReporter",
    "TrainState",
    "Trainer",
    "build_trainer",
    "bop",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "eval_logits",
    "make_mesh",
    "make_schedule",
    "maybe_initialize_distributed",
    "optimizer_config",
    "param_labels",
    "progress_at",
    "quiet_checkpoint_logs",
    "read_metrics",
    "restore_variables",
    "train_and_evaluate",
    "train_step",
    "update_flip_ratios",
    "lock_workdir",
]
