"""Dataset descriptions, normalization, and the batching rules shared by every source.

A :class:`Spec` says where a dataset comes from and what its images look like; the
per-dataset mean/std constants live here so that a model trained on ``'mean_std'`` inputs
can be fed the same normalization by a notebook or the exporter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from binax.errors import ConfigError

NORMALIZE_MODES = ("mean_std", "unit", "sym")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What binax knows about a dataset before it reads any file.

    Attributes:
      name: registry name (``binax.data.names()``).
      source: ``'idx'`` (MNIST-format files), ``'digits'`` (scikit-learn) or ``'tfds'``.
      image_shape: ``(H, W, C)`` of the batches the dataset yields; ``None`` for a generic
        tfds dataset until its builder has been read.
      num_classes: number of labels.
      mean, std: per-channel statistics of the training images on the [0, 1] scale.
      max_value: the largest raw pixel value (255, or 16 for scikit-learn digits).
      augment_default: whether ``augment=None`` in the config turns augmentation on.
      crop_pad: zero padding (pixels per side) of the random-crop augmentation; 0 for none.
      flip: whether augmentation also flips left-right at random.
      tfds_name, train_split, test_split: the tfds builder and split names.
      inception_crop: ImageNet-style random-resized-crop (train) and resize + central crop
        (eval) to ``image_shape`` instead of decoding at a fixed size.
      install_hint: how to get the files when they are missing.
    """

    name: str
    source: str
    image_shape: Optional[tuple[int, int, int]]
    num_classes: Optional[int]
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    max_value: int = 255
    augment_default: bool = False
    crop_pad: int = 0
    flip: bool = False
    tfds_name: Optional[str] = None
    train_split: str = "train"
    test_split: str = "test"
    inception_crop: bool = False
    install_hint: str = ""


def normalize(images: np.ndarray, spec: Spec, mode: str) -> np.ndarray:
    """Maps raw pixels ``x`` in ``[0, spec.max_value]`` to float32 model inputs.

    With ``u = x / max_value``:
      ``'mean_std'``: ``(u - mean) / std`` per channel (zero mean, unit variance on the
      training set); ``'unit'``: ``u`` in [0, 1]; ``'sym'``: ``2u - 1`` in [-1, 1].
    Works on numpy arrays and, with the same arithmetic, on TF tensors (``images`` is
    only combined with Python floats and float32 arrays).
    """
    u = images / np.float32(spec.max_value)
    if mode == "unit":
        return u
    if mode == "sym":
        return u * np.float32(2.0) - np.float32(1.0)
    if mode == "mean_std":
        if spec.mean is None:
            raise ConfigError(
                f"normalize='mean_std' needs mean/std constants, and binax has none for "
                f"{spec.name!r}; use normalize='unit' or 'sym'"
            )
        mean = np.asarray(spec.mean, np.float32)
        std = np.asarray(spec.std, np.float32)
        return (u - mean) / std
    raise ConfigError(f"normalize={mode!r} is not one of {NORMALIZE_MODES}")


def check_normalize(mode: str, spec: Spec) -> None:
    """Raises the error :func:`normalize` would raise, before any batch is made."""
    normalize(np.zeros((1,), np.float32), spec, mode)


class Dataset:
    """The contract with the training loop; subclasses provide the batch iterators.

    ``batch_size`` is always the GLOBAL batch: process ``p`` of ``P`` yields its own
    ``batch_size // P`` examples of every step. A training epoch has
    ``num_train // batch_size`` steps (the remainder is dropped), and its batches are a
    pure function of ``(seed, epoch)``.
    """

    def __init__(
        self,
        spec: Spec,
        *,
        num_train: int,
        num_test: int,
        seed: int,
        process_index: int,
        process_count: int,
        num_validation: int = 0,
    ):
        self.spec = spec
        self.name = spec.name
        self.image_shape = tuple(spec.image_shape)
        self.num_classes = spec.num_classes
        self.num_train = int(num_train)
        self.num_test = int(num_test)
        self.num_validation = int(num_validation)
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape}, "
            f"num_classes={self.num_classes}, num_train={self.num_train}, "
            f"num_test={self.num_test}, num_validation={self.num_validation}, process={self.process_index}/{self.process_count})"
        )

    def local_batch_size(self, batch_size: int) -> int:
        """The number of examples this process yields per step of a global ``batch_size``."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size % self.process_count:
            raise ConfigError(
                f"batch_size={batch_size} is not divisible by process_count="
                f"{self.process_count}; the global batch is split evenly over processes"
            )
        return int(batch_size) // self.process_count

    def steps_per_epoch(self, batch_size: int) -> int:
        """``num_train // batch_size``: full global batches per epoch."""
        self.local_batch_size(batch_size)
        steps = self.num_train // int(batch_size)
        if steps == 0:
            raise ConfigError(
                f"batch_size={batch_size} is larger than the {self.num_train} training "
                f"examples of {self.name!r}; an epoch would have no step"
            )
        return steps

    def num_eval_batches(self, batch_size: int, split: str = "test") -> int:
        """``ceil(n / batch_size)`` for the ``n`` examples of ``split``."""
        self.local_batch_size(batch_size)
        return math.ceil(self._split_size(split) / batch_size)

    def _split_size(self, split: str) -> int:
        if split == "train":
            return self.num_train
        if split == "test":
            return self.num_test
        if split == "validation":
            if not self.num_validation:
                raise ConfigError(
                    f"split='validation': dataset {self.name!r} has no validation split; set "
                    "data.validation_holdout to the number of training images to hold out"
                )
            return self.num_validation
        raise ConfigError(f"split={split!r} is not one of ('train', 'validation', 'test')")

    def _check_train_args(self, epoch: int, batch_size: int, start_step: int):
        """Validates the arguments of ``train_batches``; returns ``(local_batch, steps)``."""
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        local = self.local_batch_size(batch_size)
        steps = self.steps_per_epoch(batch_size)
        if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= steps:
            raise ConfigError(
                f"start_step={start_step!r} is outside [0, {steps}] (steps per epoch at "
                f"batch_size={batch_size})"
            )
        return local, steps

    def train_batches(self, epoch: int, batch_size: int, start_step: int = 0):
        """Yields ``{'image': float32 (B_local, H, W, C), 'label': int32 (B_local,)}``."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int, split: str = "test"):
        """Yields ``{'image', 'label', 'mask'}``; every example once, padding has mask 0."""
        raise NotImplementedError


def pad_batch(batch: dict, size: int) -> dict:
    """Pads every array of ``batch`` with zeros to ``size`` rows and adds ``mask``.

    ``mask`` is 1.0 for the real rows and 0.0 for the padding, so a masked mean over a
    padded evaluation set counts each real example exactly once.
    """
    n = len(batch["label"])
    if n > size:
        raise ValueError(f"batch of {n} examples does not fit in {size}")
    out = {}
    for key, value in batch.items():
        pad = np.zeros((size - n,) + value.shape[1:], value.dtype)
        out[key] = np.concatenate([value, pad]) if n < size else value
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out
