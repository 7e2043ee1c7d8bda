"""Evaluation: a model's eval-mode loss, accuracy and (optionally) logits over batches.

``evaluate(model, variables, batches)`` is the one evaluation binax has: the training
loop's test evaluation, the recipes' deployed-model checks (Self-Binarizing sign +
BinaryBN, BinaryDuo decoupling), the gradient-mismatch experiment's accuracies and the
export command's check all call it. Each batch goes through one jitted function, compiled
once per model, input shape and dtype (the model is a static argument: Flax modules hash
by their fields), built from :func:`binax.train.steps.eval_logits` and
:func:`~binax.train.steps.eval_sums`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from binax.train import steps

__all__ = ["Evaluation", "evaluate", "evaluate_splits", "array_batches", "selection_accuracy", "validation_summary",
           "validation_text"]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured over ``count`` examples (padding excluded).

    ``loss`` (mean softmax cross-entropy) and ``accuracy`` are NaN without labels;
    ``top5_accuracy`` (the label among the 5 largest logits) is NaN without labels or with
    5 classes or fewer; ``logits`` (float32, ``(count, classes)``) and ``labels`` are kept
    on request.
    """

    count: int
    loss: float
    accuracy: float
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    top5_accuracy: float = float("nan")

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        """``{prefix + 'loss', prefix + 'accuracy'}`` and, with more than 5 classes,
        ``prefix + 'top5_accuracy'``, as the training loop records them."""
        out = {prefix + "loss": self.loss, prefix + "accuracy": self.accuracy}
        if not np.isnan(self.top5_accuracy):
            out[prefix + "top5_accuracy"] = self.top5_accuracy
        return out


@functools.partial(jax.jit, static_argnames=("model", "compute_dtype", "with_logits"))
def _eval_batch(variables, batch, progress, *, model, compute_dtype, with_logits):
    logits = steps.eval_logits(model, variables, batch["image"], progress, compute_dtype)
    sums = steps.eval_sums(logits, batch.get("label"), batch["mask"])
    return sums, (logits if with_logits else None)


def array_batches(images, labels=None, batch_size: int = 1000) -> Iterator[dict[str, np.ndarray]]:
    """In-memory arrays as eval batches ``{'image', ['label'], 'mask'}``; the last one is
    padded to ``batch_size`` (mask 0), so every batch has one shape (one compilation)."""
    images = np.asarray(images)
    n = len(images)
    batch_size = min(batch_size, max(n, 1))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        batch = {"image": images[start:stop], "mask": np.ones(stop - start, np.float32)}
        if labels is not None:
            batch["label"] = np.asarray(labels)[start:stop]
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
        yield batch


def evaluate(
    model,
    variables: Mapping[str, Any],
    batches: Iterable[Mapping[str, Any]],
    *,
    progress: float | jax.Array = 1.0,
    compute_dtype: Any = jnp.float32,
    keep_logits: bool = False,
    put: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> Evaluation:
    """Eval-mode (``train=False``) loss, accuracy and optionally logits of ``model``.

    Args:
      model: a binax model (any Flax module called as ``model.apply(v, x, train=False,
        progress=p)``).
      variables: ``{'params', 'batch_stats'}`` (whatever collections the model has).
      batches: dicts with ``'image'``, optionally ``'label'``, and ``'mask'`` (1 for real
        examples; absent: all real), e.g. ``ds.eval_batches(n)`` or :func:`array_batches`.
      progress: training progress the binarizer schedules read (1.0: the end).
      compute_dtype: ``jnp.float32`` or ``jnp.bfloat16`` (or their names), as in training.
      keep_logits: also return the logits and labels of the real examples.
      put: maps each host batch to device arrays first (the training loop passes its
        sharding of the global batch); default: as given.
    """
    if isinstance(compute_dtype, str):
        compute_dtype = steps.COMPUTE_DTYPES[compute_dtype]
    progress = jnp.float32(progress)
    totals = None  # float32 sums on the device
    logits, labels = [], []
    for batch in batches:
        batch = dict(batch)
        if "mask" not in batch:
            batch["mask"] = np.ones(len(batch["image"]), np.float32)
        device_batch = put(batch) if put is not None else batch
        sums, out = _eval_batch(
            variables, device_batch, progress, model=model, compute_dtype=jnp.dtype(compute_dtype), with_logits=keep_logits
        )
        totals = sums if totals is None else {k: totals[k] + v for k, v in sums.items()}
        if keep_logits:
            keep = np.asarray(batch["mask"]) > 0
            logits.append(np.asarray(out)[keep])
            if "label" in batch:
                labels.append(np.asarray(batch["label"])[keep])
    totals = {k: float(v) for k, v in jax.device_get(totals or {}).items()}
    count = int(totals.get("count", 0))
    nan = float("nan")
    return Evaluation(
        count=count,
        loss=totals["loss_sum"] / count if "loss_sum" in totals and count else nan,
        accuracy=totals["correct"] / count if "correct" in totals and count else nan,
        logits=np.concatenate(logits) if keep_logits and logits else None,
        labels=np.concatenate(labels) if keep_logits and labels else None,
        top5_accuracy=totals["correct_top5"] / count if "correct_top5" in totals and count else nan,
    )


def evaluate_splits(model, variables: Mapping[str, Any], ds, batch_size: int, **kwargs) -> dict[str, float]:
    """``test/`` metrics of ``ds``'s test split and, when it has one
    (``data.validation_holdout``), ``validation/`` metrics of its validation split.
    ``kwargs`` go to :func:`evaluate`."""
    out = evaluate(model, variables, ds.eval_batches(batch_size), **kwargs).metrics("test/")
    if getattr(ds, "num_validation", 0):
        out.update(evaluate(model, variables, ds.eval_batches(batch_size, "validation"), **kwargs).metrics("validation/"))
    return out


def selection_accuracy(metrics: Mapping[str, float]) -> float:
    """The accuracy a run's choices read (its "best" checkpoint): validation when the
    run has a validation split, so that the test set chooses nothing; else test."""
    return metrics.get("validation/accuracy", metrics["test/accuracy"])


def validation_summary(metrics: Mapping[str, float]) -> dict[str, float]:
    """``{'validation_accuracy', 'validation_loss'}`` for ``final.json``; empty without a
    validation split."""
    if "validation/accuracy" not in metrics:
        return {}
    return {"validation_accuracy": metrics["validation/accuracy"], "validation_loss": metrics["validation/loss"]}


def validation_text(accuracy: float | None) -> str:
    """``", validation 88.12%"`` for a progress line (the epoch's and the run's last);
    empty without a validation split (``accuracy`` None)."""
    return "" if accuracy is None else f", validation {100 * accuracy:.2f}%"
