"""The training config's schema: every key ``binax.train.train_and_evaluate`` reads, with
its default (:func:`base_config`), the model block (:func:`model_config`), the ``arg``
string parser of config files and the ``quick`` shrink.

A config file is ``get_config(arg=None)`` returning a ``ConfigDict``; ``arg`` is the text
after ``:`` in ``--config configs/x.py:quick,epochs=2`` (big_vision's convention).
Every key the trainer reads exists in ``base_config()``, so ``--config.a.b=v`` can set any
of them and a typo is an error (the flag locks the config). The config files of the
repository (``configs/*.py``) start from here; so can a config built in Python with only
the installed package::

    from binax import config, train

    c = config.base_config()
    c.data.name = "digits"
    c.model = config.model_config("bnn_mlp", widths=(256, 256), input_quantizer="ede_sign")
    train.train_and_evaluate(c, "runs/digits")
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

import binax.data
import binax.models
from binax.errors import ConfigError
from binax.train import optimizer_config


_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``'quick,epochs=3'`` -> ``{quick: True, epochs: 3}`` over ``defaults``.

    A bare word sets a boolean to True; ``key=value`` is converted to the default's type.
    Unknown keys raise a ``ValueError`` naming the valid ones.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; valid: {sorted(defaults)}")
        kind = type(defaults[key])
        if not sep:
            if kind is not bool:
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif kind is bool:
            word = value.strip().lower()
            if word not in _TRUE + _FALSE:
                raise ConfigError(
                    f"config argument {key}={value!r} must be one of {', '.join(_TRUE + _FALSE)} (or {key} alone for true)"
                )
            out[key] = word in _TRUE
        else:
            out[key] = kind(value)
    return out


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """``{name, **binax.models.get_config(name, **overrides)}``: every model key is there
    (the model class's fields), so flags can set any of them
    (``--config.model.widths='(512, 512)'``)."""
    out = binax.models.get_config(name, **overrides)
    out.unlock()
    out.name = name
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key ``binax.train.train_and_evaluate`` reads, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # config.model: {name, **overrides of binax.models.get_config(name)}; see model_config().
    c.model = model_config("bnn_mlp")
    c.data = binax.data.default_config()
    # The optimizer of every parameter, or of every parameter but the latent binary
    # kernels when binary_optimizer.name is set (e.g. 'bop').
    c.optimizer = optimizer_config()
    c.binary_optimizer = optimizer_config()
    c.binary_optimizer.name = ""
    c.grad_clip_norm = 0.0  # 0: no clipping of the global gradient norm
    c.num_epochs = 5
    # Cut every epoch to this many steps (None: whole epochs); for quick runs.
    c.max_steps_per_epoch = config_dict.placeholder(int)
    c.batch_size = 128  # global, over all devices and processes
    c.eval_batch_size = 1000
    c.label_smoothing = 0.0
    # Binarizer schedules (EDE's t, tanh's nu) read progress in [0, 1] per 'epoch'
    # (IR-Net's official code) or per 'step'.
    c.progress_unit = "epoch"
    # Clip latent binary weights to [-c, c] after each update; None: the model's own
    # latent_weight_clip (BNN models: 1.0, IR-Net: none).
    c.latent_weight_clip = config_dict.placeholder(float)
    c.compute_dtype = "float32"  # or 'bfloat16' (float32 master weights)
    c.log_every_steps = 100
    c.report_every_seconds = 30.0
    c.eval_every_epochs = 1  # 0: only after the last epoch
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=2, async_save=True))
    # Multi-process: num_processes > 1 with the coordinator's host:port and this process's
    # id, or auto=True to let JAX detect SLURM/MPI/Kubernetes/TPU settings.
    c.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=1, process_id=0, auto=False)
    )
    return c


#: Below this many epochs, binarizer schedules read per-step progress (see progress_unit).
MIN_EPOCHS_FOR_EPOCH_PROGRESS = 10


def progress_unit(num_epochs: int) -> str:
    """``'epoch'`` (IR-Net's official stepping: t set once per epoch) for runs of at least
    ``MIN_EPOCHS_FOR_EPOCH_PROGRESS`` epochs, else ``'step'``.

    Per-epoch progress takes only the values 0, 1/E, ..., (E-1)/E while training: a 1-epoch
    run never moves its schedule (EDE's t stays at t_min, tanh's nu at nu_0) and a 5-epoch
    run stops EDE at t = 4 of its 10. Per-step progress follows the same curve
    continuously; over hundreds of epochs (the papers' runs) the two are the same.
    """
    return "epoch" if num_epochs >= MIN_EPOCHS_FOR_EPOCH_PROGRESS else "step"


def shrink_quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``quick`` variant: one epoch of at most 200 steps of a 4x narrower model, for a
    check that the whole pipeline runs (under a minute on 2 CPU cores), not for accuracy.
    Progress is per step, so the binarizer schedules still run their whole range, and the
    learning-rate schedule is compressed the same way: warm-up and decay epochs are scaled
    by ``1 / num_epochs`` (a 4-epoch warm-up of 100 epochs becomes 4 % of the one epoch)."""
    scale = 1.0 / c.num_epochs
    for opt in (c.optimizer, c.binary_optimizer):
        opt.warmup_epochs = opt.warmup_epochs * scale
        opt.step_epochs = tuple(e * scale for e in opt.step_epochs)
    c.num_epochs = 1
    c.progress_unit = progress_unit(c.num_epochs)
    c.max_steps_per_epoch = 200
    c.model.width_multiplier = c.model.width_multiplier / 4
    c.log_every_steps = 50
    c.report_every_seconds = 10.0
    c.checkpoint.every_steps = 200
    return c
