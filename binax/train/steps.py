"""The training state, the pure train step and the eval forward.

``train_step(state, batch, progress, rng, ...)`` is a pure function: it returns a new
state and a dict of scalar metrics and touches nothing else, so one ``jax.jit`` of it
serves one device, many devices (the batch sharded over a ``'data'`` mesh axis, the state
replicated: XLA inserts the gradient all-reduce and batch norm sees the global batch) and
many hosts alike.
"""

from __future__ import annotations

import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from binax import layers

__all__ = [
    "TrainState",
    "create_train_state",
    "train_step",
    "eval_logits",
    "eval_sums",
    "progress_at",
    "update_flip_ratios",
    "COMPUTE_DTYPES",
]

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs, as one pytree (checkpointed whole).

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      params, batch_stats: the model's variable collections (float32 master copies).
      opt_state: the optax state.
      rng: the run's base PRNG key; the key of update ``s`` is ``fold_in(rng, s)``, so no
        key is carried from step to step and a resumed run draws the same keys.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(model, tx: optax.GradientTransformation, image_shape, rng: jax.Array) -> TrainState:
    """Initializes the model on one dummy image and the optimizer on its parameters."""
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(
        {"params": init_rng, "dropout": init_rng}, jnp.zeros((1, *image_shape), jnp.float32), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=state_rng,
    )


def progress_at(step, *, steps_per_epoch: int, num_epochs: int, unit: str = "epoch"):
    """Training progress in [0, 1] before update ``step``.

    ``unit='epoch'``: ``floor(step / steps_per_epoch) / num_epochs``, constant within an
    epoch, as IR-Net's official code steps its EDE schedule; ``unit='step'``:
    ``step / (steps_per_epoch * num_epochs)``. Both reach 1 after the last update, which is
    the progress the final evaluation uses. ``'epoch'`` with one epoch keeps progress at 0
    for the whole run, and warns (``binax.config.progress_unit`` picks ``'step'`` for
    short runs). A traced ``step`` gives a float32 array (used
    inside the jitted step); a Python int gives a float (for logging, without compiling).
    """
    xp = np if isinstance(step, (int, np.integer)) else jnp
    step = xp.asarray(step, xp.float32)
    if unit == "epoch" and num_epochs == 1:
        warnings.warn(
            "progress_unit='epoch' with num_epochs=1: progress stays 0 until training ends, so "
            "binarizer schedules (EDE's t, tanh's nu) never move; use progress_unit='step'.",
            stacklevel=2,
        )
    if unit == "epoch":
        p = xp.floor(step / steps_per_epoch) / num_epochs
    elif unit == "step":
        p = step / (steps_per_epoch * num_epochs)
    else:
        raise ValueError(f"progress_unit={unit!r} is not one of ('epoch', 'step')")
    p = xp.clip(p, 0.0, 1.0)
    return float(p) if xp is np else p


def update_flip_ratios(old_params, new_params) -> dict[str, jax.Array]:
    """The share of binary weights whose sign (0 counts as +1) one update changed.

    ``{'flip_ratio': over all latent kernels, 'flip_ratio/<layer>': per latent kernel}``
    (empty without latent kernels). Larq's ``FlipRatio`` callback watches the same
    quantity (Helwegen et al. 2019): how often binary weights still change sign; it falls
    towards 0 as training settles. Computed inside the jitted step, so averaging it over
    a metric record's updates gives the same number however the run was interrupted.
    """
    out, flipped, total = {}, 0, 0
    leaves = jax.tree_util.tree_leaves_with_path(old_params)
    for (path, old), new in zip(leaves, jax.tree.leaves(new_params)):
        if not layers.is_latent_kernel_path(path):
            continue
        n = jnp.sum((old >= 0) != (new >= 0), dtype=jnp.int32)
        layer = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        out[f"flip_ratio/{layer}"] = n.astype(jnp.float32) / old.size
        flipped, total = flipped + n, total + old.size
    if total:
        out["flip_ratio"] = flipped.astype(jnp.float32) / total
    return out


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    progress: jax.Array,
    rng: jax.Array,
    *,
    model,
    tx: optax.GradientTransformation,
    latent_weight_clip: float | None = None,
    compute_dtype=jnp.float32,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch = {'image', 'label'}``; returns ``(new_state, metrics)``.

    Loss: mean softmax cross-entropy (with ``label_smoothing``, Szegedy et al. 2016) in
    float32. With ``compute_dtype=bfloat16`` the forward and backward run on bfloat16
    copies of the parameters and images while the gradients, optimizer and master weights
    stay float32 (mixed precision, Micikevicius et al. 2018). After the update, latent
    binary kernels are clipped to ``[-latent_weight_clip, latent_weight_clip]`` if given.
    ``progress`` reaches every binarizer schedule as a traced scalar, so changing it never
    recompiles. Metrics: ``loss``, ``accuracy``, ``grad_norm``, ``update_norm``,
    ``param_norm`` (global L2 norms over the whole tree) and the update's flip ratios
    (:func:`update_flip_ratios`).
    """
    labels = batch["label"]
    images = batch["image"].astype(compute_dtype)

    def loss_fn(params):
        variables = {"params": _cast_floats(params, compute_dtype), "batch_stats": state.batch_stats}
        logits, new_vars = model.apply(
            variables, images, train=True, progress=progress, mutable=["batch_stats"], rngs={"dropout": rng}
        )
        logits = logits.astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, new_vars.get("batch_stats", {}))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # Keep the stored statistics in their own dtype whatever precision the forward used.
    batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), batch_stats, state.batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = layers.clip_latent_weights(params, latent_weight_clip)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        **update_flip_ratios(state.params, params),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics


def eval_logits(model, variables, images: jax.Array, progress, compute_dtype=jnp.float32) -> jax.Array:
    """The model's eval-mode logits (batch norm on running statistics), as float32.

    The one definition of "the model at inference" that training evaluation, the recipes'
    deployed-model checks, the mismatch experiment and the export check all use
    (:func:`binax.train.evaluate`): parameters and images cast to ``compute_dtype``.
    """
    variables = {**variables, "params": _cast_floats(variables["params"], compute_dtype)}
    logits = model.apply(variables, images.astype(compute_dtype), train=False, progress=progress)
    return logits.astype(jnp.float32)


#: Top-k accuracy is counted with this k when a model has more than k classes.
TOP_K = 5


def eval_sums(logits: jax.Array, labels: jax.Array | None, mask: jax.Array) -> dict[str, jax.Array]:
    """``loss_sum``, ``correct`` and ``count`` over the rows where ``mask`` is 1 (only
    ``count`` without labels), and ``correct_top5`` with more than 5 classes: rows whose
    label's logit is exceeded by fewer than 5 others (a tie counts for the label)."""
    mask = mask.astype(jnp.float32)
    if labels is None:
        return {"count": jnp.sum(mask)}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {
        "loss_sum": jnp.sum(loss * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "count": jnp.sum(mask),
    }
    if logits.shape[-1] > TOP_K:
        label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), -1)
        in_top = jnp.sum(logits > label_logit, -1) < TOP_K
        sums["correct_top5"] = jnp.sum(in_top * mask)
    return sums
