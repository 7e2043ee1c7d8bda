"""Datasets that fit in memory: IDX files (MNIST, Fashion-MNIST) and scikit-learn digits.

Everything is numpy. The training order of epoch ``e`` is the permutation drawn by
``np.random.default_rng([seed, e])``, and the augmentation of the example at position
``i`` of that epoch comes from a second generator seeded with ``[seed, e, 1]``; so a batch
depends only on ``(seed, epoch, step)`` — not on how many processes share the work, nor
on where an interrupted run resumed.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from binax.data import idx as idx_lib
from binax.data import registry
from binax.data.spec import Dataset, Spec, normalize, pad_batch
from binax.errors import ConfigError, DataError, MissingDataError, MissingDependencyError

# scikit-learn digits: the last DIGITS_TEST_SIZE of the 1797 images are the test split.
DIGITS_TEST_SIZE = 297

_AUGMENT_STREAM = 1  # third seed word of the augmentation generator


def _resolve_idx_dir(spec: Spec, data_dir: Optional[str]) -> str:
    if data_dir:
        return os.fspath(data_dir)
    if spec.name == "fashion_mnist":
        return registry.FASHION_MNIST_DIR
    raise MissingDataError(f"no data_dir for {spec.name!r}. {spec.install_hint}")


def _check_labels(spec: Spec, split: str, labels: np.ndarray, source: str) -> None:
    """Labels outside ``[0, num_classes)`` would train as all-zero one-hot rows, silently."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"dataset {spec.name!r} ({split}, {source}) has label {int(labels[first])} at index {first} "
            f"({int(bad.sum())} labels out of range); labels must be in [0, {spec.num_classes})"
        )


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, split: str, data_dir: Optional[str]):
    spec = registry.get_spec(name)
    if spec.source == "idx":
        directory = _resolve_idx_dir(spec, data_dir)
        paths = [idx_lib.find_idx_file(directory, stem) for stem in idx_lib.IDX_FILES[split]]
        if None in paths:
            missing = [s for s, p in zip(idx_lib.IDX_FILES[split], paths) if p is None]
            raise MissingDataError(
                f"{spec.name} {split} files {missing} (.gz or raw) not found in "
                f"{directory!r}. {spec.install_hint}"
            )
        images = idx_lib.load_idx(paths[0])
        labels = idx_lib.load_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"{paths}: expected images (N, H, W) and labels (N,), got shapes "
                f"{images.shape} and {labels.shape}"
            )
        images = images[..., None]
    elif spec.source == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise MissingDependencyError(f"the 'digits' dataset needs scikit-learn. {spec.install_hint}") from e
        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]  # values 0..16
        labels = digits.target
        cut = len(images) - DIGITS_TEST_SIZE
        images, labels = (images[:cut], labels[:cut]) if split == "train" else (
            images[cut:], labels[cut:])
    else:
        raise ConfigError(f"{name!r} is a {spec.source} dataset, not an in-memory one")
    images = np.ascontiguousarray(images, dtype=np.uint8)
    _check_labels(spec, split, labels, paths[1] if spec.source == "idx" else "scikit-learn's digits")
    labels = np.asarray(labels, dtype=np.int32)
    # Cached arrays are shared by every caller; read-only keeps one caller from editing
    # another's data.
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_arrays(name: str, split: str, data_dir: Optional[str] = None):
    """Raw ``(images, labels)`` of an in-memory dataset, for notebooks and exactness tests.

    Args:
      name: ``'fashion_mnist'``, ``'mnist'`` or ``'digits'``.
      split: ``'train'`` or ``'test'`` (digits: the first 1500 / last 297 images).
      data_dir: directory of the IDX files; ``None`` means Debian's
        ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST (MNIST has no default).

    Returns:
      ``uint8`` images ``(N, H, W, 1)`` with raw pixel values (0..255, digits 0..16) and
      ``int32`` labels ``(N,)``; both read-only (they are cached).
    """
    spec = registry.get_spec(name)
    if spec.source not in ("idx", "digits"):
        in_memory = [n for n, s in registry.SPECS.items() if s.source in ("idx", "digits")]
        raise ConfigError(f"load_arrays reads {in_memory}, not {name!r}")
    if split not in idx_lib.IDX_FILES:
        raise ConfigError(f"split={split!r} is not one of {tuple(idx_lib.IDX_FILES)}")
    return _load_cached(spec.name, split, os.fspath(data_dir) if data_dir else None)


def random_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray,
                     pad: int) -> np.ndarray:
    """Zero-pads each image by ``pad`` pixels, crops it back to size, and mirrors some.

    ``out[i] = mirror_i(padded_i[dy_i : dy_i + H, dx_i : dx_i + W])`` with
    ``(dy_i, dx_i) = offsets[i]`` in ``[0, 2 pad]`` and ``mirror_i`` reversing the width
    axis where ``flips[i]``: the pad-and-random-crop augmentation of He et al. (2016).
    """
    n, h, w, _ = images.shape
    if pad:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        # windows[i, dy, dx] is the H x W crop at (dy, dx), without copying.
        windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))
        images = windows[np.arange(n), offsets[:, 0], offsets[:, 1]]  # (N, C, H, W)
        images = np.moveaxis(images, 1, -1)
    if flips is not None and flips.any():
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return np.ascontiguousarray(images)


def split_holdout(images: np.ndarray, labels: np.ndarray, holdout: int, name: str = "dataset"):
    """``((train images, labels), (validation images, labels))``: the last ``holdout``
    examples are the validation split, the others the training split.

    The cut is by position in the files, not drawn at random: the same images for every
    seed and run, and for Fashion-MNIST's ``holdout=10000`` the training files' last
    10,000 images (indices 50,000-59,999). ``holdout`` must be in ``[0, len(labels))``
    (at least one training image must remain).
    """
    n = len(labels)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, np.integer)) or not 0 <= holdout < n:
        raise ConfigError(
            f"data.validation_holdout={holdout!r} must be an integer in [0, {n}) for {name!r}, "
            f"whose training split has {n} images"
        )
    cut = n - int(holdout)
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


class ArrayDataset(Dataset):
    """An in-memory dataset; see the module docstring for how batches are drawn.

    ``validation_holdout=n`` makes the last ``n`` training images the validation split
    (:func:`split_holdout`): they are never in a training batch, and
    ``eval_batches(..., split='validation')`` yields them.
    """

    def __init__(self, spec: Spec, *, data_dir: Optional[str], seed: int, augment: bool,
                 normalize_mode: str, process_index: int, process_count: int,
                 validation_holdout: int = 0):
        images, labels = load_arrays(spec.name, "train", data_dir)
        self._train, self._validation = split_holdout(images, labels, validation_holdout, spec.name)
        self._test = load_arrays(spec.name, "test", data_dir)
        super().__init__(
            spec,
            num_train=len(self._train[1]),
            num_test=len(self._test[1]),
            num_validation=len(self._validation[1]),
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.augment = augment
        self.normalize_mode = normalize_mode

    def _finish(self, images: np.ndarray, labels: np.ndarray) -> dict:
        return {
            "image": normalize(images.astype(np.float32), self.spec, self.normalize_mode),
            "label": labels,
        }

    def train_order(self, epoch: int) -> np.ndarray:
        """The permutation of training indices that epoch ``epoch`` walks through."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_train)

    def train_batches(self, epoch: int, batch_size: int, start_step: int = 0):
        local, steps = self._check_train_args(epoch, batch_size, start_step)
        return self._train_iter(epoch, batch_size, local, steps, start_step)

    def _train_iter(self, epoch, batch_size, local, steps, start_step):
        images, labels = self._train
        order = self.train_order(epoch)
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, _AUGMENT_STREAM])
            pad = self.spec.crop_pad
            offsets = rng.integers(0, 2 * pad + 1, size=(self.num_train, 2))
            flips = rng.random(self.num_train) < 0.5 if self.spec.flip else None
        first = self.process_index * local
        for step in range(start_step, steps):
            positions = step * batch_size + first + np.arange(local)
            index = order[positions]
            batch = images[index]
            if self.augment:
                batch = random_crop_flip(
                    batch, offsets[positions], None if flips is None else flips[positions], pad)
            yield self._finish(batch, labels[index])

    def eval_batches(self, batch_size: int, split: str = "test"):
        local = self.local_batch_size(batch_size)
        n = self._split_size(split)
        arrays = {"train": self._train, "validation": self._validation, "test": self._test}[split]
        return self._eval_iter(arrays, batch_size, local, n)

    def _eval_iter(self, arrays, batch_size, local, n):
        images, labels = arrays
        for start in range(0, n, batch_size):
            lo = min(start + self.process_index * local, n)
            hi = min(lo + local, n)
            yield pad_batch(self._finish(images[lo:hi], labels[lo:hi]), local)
