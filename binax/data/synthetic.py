"""Synthetic batches made on the devices: ``config.data.name = 'synthetic'``.

For measuring a training step on any accelerator before a real dataset is built: every
batch is drawn by one jitted ``jax.random`` function whose output is already the global
batch, sharded over every device on the ``'data'`` axis (as the training loop shards a
real one), so no host pipeline, host-to-device copy or file is involved. Images are
standard normal float32 (what a ``mean_std``-normalized pipeline gives), labels uniform
over ``num_classes``; nothing is learnable.

Shape and classes come from ``config.data.image_shape`` (default ImageNet's
``(224, 224, 3)``) and ``config.data.num_classes`` (default 1000); ``num_train`` /
``num_test`` set the epoch and evaluation sizes (default ImageNet's 1,281,167 and 50,000).
Batch ``k`` of epoch ``e`` is drawn from ``fold_in(fold_in(key(seed), e), k)``, so the
sequence is a pure function of ``(seed, epoch)`` and resumes at any step like the other
datasets.
"""

from __future__ import annotations

import functools
import numbers
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from binax.data.spec import Dataset, Spec
from binax.errors import ConfigError

#: ImageNet-shaped by default, so a step measured here is the step ImageNet will take.
DEFAULT_IMAGE_SHAPE = (224, 224, 3)
DEFAULT_NUM_CLASSES = 1000
DEFAULT_NUM_TRAIN = 1_281_167
DEFAULT_NUM_TEST = 50_000

_EVAL_STREAM = 2**31 - 1  # the evaluation's own key, never an epoch number


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral,)) or value < 1:
        raise ConfigError(f"data.{key}={value!r} must be a positive integer")
    return int(value)


def check_image_shape(value) -> tuple[int, int, int]:
    """``(H, W, C)`` of positive integers, or a :class:`ConfigError` naming the value."""
    try:
        shape = tuple(value)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 3:
        raise ConfigError(
            f"data.image_shape={value!r} must be (height, width, channels), three positive integers"
        )
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise ConfigError(f"data.image_shape={value!r} must hold three positive integers (height, width, channels)")
    return tuple(int(d) for d in shape)


def batch_sharding() -> NamedSharding:
    """The batch dimension over every device of every process (the loop's data sharding)."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, P("data"))


@functools.partial(jax.jit, static_argnames=("batch", "shape", "num_classes", "sharding"))
def _draw(key, *, batch: int, shape: tuple, num_classes: int, sharding):
    image_key, label_key = jax.random.split(key)
    images = jax.random.normal(image_key, (batch, *shape), jnp.float32)
    labels = jax.random.randint(label_key, (batch,), 0, num_classes, jnp.int32)
    images = jax.lax.with_sharding_constraint(images, sharding)
    labels = jax.lax.with_sharding_constraint(labels, sharding)
    return {"image": images, "label": labels}


class SyntheticDataset(Dataset):
    """Random global batches drawn on the devices (see the module docstring).

    Unlike the file-backed datasets, ``train_batches`` and ``eval_batches`` yield GLOBAL
    ``jax.Array`` batches (``batch_size`` rows, sharded over all devices), which the
    training loop uses as they are.
    """

    on_device = True

    def __init__(self, spec: Spec, *, seed: int, process_index: int, process_count: int,
                 image_shape=None, num_classes=None, num_train=None, num_test=None):
        shape = check_image_shape(DEFAULT_IMAGE_SHAPE if image_shape is None else image_shape)
        classes = _positive_int(DEFAULT_NUM_CLASSES if num_classes is None else num_classes, "num_classes")
        spec = Spec(**{**spec.__dict__, "image_shape": shape, "num_classes": classes})
        super().__init__(
            spec,
            num_train=_positive_int(DEFAULT_NUM_TRAIN if num_train is None else num_train, "num_train"),
            num_test=_positive_int(DEFAULT_NUM_TEST if num_test is None else num_test, "num_test"),
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )

    def _batch(self, key, batch_size: int) -> dict:
        return _draw(key, batch=int(batch_size), shape=self.image_shape, num_classes=self.num_classes,
                     sharding=batch_sharding())

    def _check_global(self, batch_size: int) -> None:
        if batch_size % jax.device_count():
            raise ConfigError(
                f"batch_size={batch_size} must be a multiple of the {jax.device_count()} devices "
                "(synthetic batches are sharded over every device)"
            )

    def train_batches(self, epoch: int, batch_size: int, start_step: int = 0) -> Iterator[dict]:
        """Yields global ``{'image': float32 (B, H, W, C), 'label': int32 (B,)}`` arrays."""
        _, steps = self._check_train_args(epoch, batch_size, start_step)
        self._check_global(batch_size)
        epoch_key = jax.random.fold_in(jax.random.key(self.seed), epoch)
        for step in range(start_step, steps):
            yield self._batch(jax.random.fold_in(epoch_key, step), batch_size)

    def eval_batches(self, batch_size: int, split: str = "test") -> Iterator[dict]:
        """Yields global batches with ``mask``; the last one's padding has mask 0."""
        n = self._split_size(split)
        self.local_batch_size(batch_size)
        self._check_global(batch_size)
        eval_key = jax.random.fold_in(jax.random.key(self.seed), _EVAL_STREAM)
        sharding = batch_sharding()
        for i, start in enumerate(range(0, n, batch_size)):
            batch = self._batch(jax.random.fold_in(eval_key, i), batch_size)
            real = min(batch_size, n - start)
            mask = (np.arange(batch_size) < real).astype(np.float32)
            # From a callback: each process fills only its own devices' rows.
            batch["mask"] = jax.make_array_from_callback(mask.shape, sharding, lambda index: mask[index])
            yield batch
