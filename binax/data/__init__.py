"""Input data: IDX files (MNIST, Fashion-MNIST), scikit-learn digits, tfds pipelines, and
synthetic batches drawn on the devices (``name='synthetic'``, :mod:`binax.data.synthetic`).

::

    ds = binax.data.create(config.data, seed=0, process_index=jax.process_index(),
                           process_count=jax.process_count())
    for batch in ds.train_batches(epoch, batch_size, start_step):   # process-local numpy
        ...                                  # {'image': f32 (B/P, H, W, C), 'label': i32}
    for batch in ds.eval_batches(batch_size):                       # + 'mask' (f32 0/1)
        ...
    ds.eval_batches(batch_size, split='validation')  # with data.validation_holdout = n > 0

The batches of an epoch are a pure function of ``(seed, epoch)``; ``start_step=k`` yields
exactly batches ``k, k+1, ...`` of that sequence, so a killed run resumes bit-exactly.
TensorFlow is imported only when a tfds dataset is created.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
from ml_collections import config_dict

from binax.data.idx import load_idx, parse_idx
from binax.data.in_memory import ArrayDataset, load_arrays, random_crop_flip
from binax.data.registry import SPECS, get_spec, names
from binax.data.spec import NORMALIZE_MODES, Dataset, Spec, check_normalize, normalize
from binax.errors import ConfigError

__all__ = [
    "ArrayDataset", "Dataset", "NORMALIZE_MODES", "SPECS", "Spec", "create",
    "default_config", "get_spec", "load_arrays", "load_idx", "names", "normalize",
    "parse_idx", "random_crop_flip",
]


def default_config() -> ml_collections.ConfigDict:
    """The ``config.data`` fields :func:`create` reads, with their defaults."""
    config = ml_collections.ConfigDict()
    # A name from binax.data.names(), or 'tfds:<builder>' for another tfds dataset.
    config.name = "fashion_mnist"
    # Where the files are. None: Debian's /usr/share/datasets/fashion-mnist for the IDX
    # Fashion-MNIST, tfds's default data_dir (TFDS_DATA_DIR or ~/tensorflow_datasets) for
    # tfds datasets. MNIST has no default.
    config.data_dir = config_dict.placeholder(str)
    # Training augmentation. None: the dataset's default (on for CIFAR and ImageNet, off
    # for the MNIST family and digits, where it is a 2-pixel (digits: 1) pad-and-crop,
    # with a flip for Fashion-MNIST only).
    config.augment = config_dict.placeholder(bool)
    # 'mean_std' ((x - mean) / std per channel), 'unit' ([0, 1]) or 'sym' ([-1, 1]).
    config.normalize = "mean_std"
    # tfds only: examples in the shuffle buffer (on top of shuffled file order).
    config.shuffle_buffer = 16_384
    # ImageNet-style datasets only (random-resized crop, resize + central crop): the side
    # of the square images the pipeline yields. None: the dataset's own (224). A smaller
    # side runs the same pipeline and model faster (e.g. a CPU smoke test at 64).
    config.image_size = config_dict.placeholder(int)
    # name='synthetic' only (random batches drawn on the devices, binax.data.synthetic):
    # image (height, width, channels), classes, and train/test examples. None: ImageNet's
    # (224, 224, 3), 1000 classes, 1,281,167 / 50,000 examples.
    config.image_shape = config_dict.placeholder(tuple)
    config.num_classes = config_dict.placeholder(int)
    config.num_train = config_dict.placeholder(int)
    config.num_test = config_dict.placeholder(int)
    # In-memory datasets only (fashion_mnist, mnist, digits): the LAST n images of the
    # training split become the validation split (``eval_batches(..., split='validation')``)
    # and are never trained on; 0 = no validation split, train on all of them. The split is
    # fixed by the files' order (no seed), so every run and seed holds out the same images.
    # Fashion-MNIST's recipes (configs/recipe.py) hold out 10,000 of the 60,000.
    config.validation_holdout = 0
    return config


#: The config.data keys only name='synthetic' reads.
SYNTHETIC_KEYS = ("image_shape", "num_classes", "num_train", "num_test")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _with_image_size(spec: Spec, size) -> Spec:
    """``spec`` yielding ``size x size`` images (``None``: unchanged)."""
    if size is None:
        return spec
    if not spec.inception_crop:
        raise ConfigError(
            f"data.image_size={size!r} applies to datasets that crop and resize "
            f"(imagenet2012); {spec.name!r} has fixed-size images, leave it None"
        )
    if not _is_int(size) or not 1 <= size <= 4096:
        raise ConfigError(f"data.image_size={size!r} must be an integer in [1, 4096]")
    return dataclasses.replace(spec, image_shape=(int(size), int(size), spec.image_shape[2]))


def create(data_config, *, seed: int, process_index: int = 0, process_count: int = 1) -> Dataset:
    """Builds the dataset ``data_config`` names (see :func:`default_config`).

    Args:
      data_config: a ``ConfigDict`` (or mapping) with the fields of
        :func:`default_config`; missing fields take their defaults, unknown ones are an
        error (a typo would otherwise be ignored).
      seed: non-negative integer; with the epoch it fixes order and augmentation.
      process_index, process_count: this process's slot; each process yields its
        ``batch_size // process_count`` share of every global batch.

    Raises:
      ValueError: unknown dataset name, config field or normalize mode; bad seed/process.
      FileNotFoundError: the data is not there; the message says how to get it.
    """
    config = default_config()
    given = dict(data_config.items()) if hasattr(data_config, "items") else None
    if given is None:
        raise ConfigError(f"data_config must be a ConfigDict or mapping, got {data_config!r}")
    unknown = sorted(set(given) - set(config.keys()))
    if unknown:
        raise ConfigError(f"unknown data config field(s) {unknown}; valid: {sorted(config.keys())}")
    holdout = given.get("validation_holdout") or 0
    if not _is_int(holdout) or holdout < 0:  # before the typed ConfigDict turns it into a TypeError
        raise ConfigError(
            f"data.validation_holdout={holdout!r} must be a non-negative integer (training images held out for validation)"
        )
    for key, value in given.items():
        if value is not None:
            config[key] = value
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not _is_int(process_count) or process_count < 1:
        raise ConfigError(f"process_count must be a positive integer, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index!r} is outside [0, {process_count})")
    seed, process_index, process_count = int(seed), int(process_index), int(process_count)

    spec = _with_image_size(get_spec(config.name), config.image_size)
    check_normalize(config.normalize, spec)
    augment = spec.augment_default if config.augment is None else bool(config.augment)
    common = dict(data_dir=config.data_dir, seed=seed, augment=augment,
                  normalize_mode=config.normalize, process_index=process_index,
                  process_count=process_count)
    synthetic_keys = {k: config[k] for k in SYNTHETIC_KEYS}
    if holdout and spec.source not in ("idx", "digits"):
        raise ConfigError(
            f"data.validation_holdout={holdout!r} applies to the in-memory datasets (fashion_mnist, mnist, digits); "
            f"{config.name!r} has no validation split in binax, leave it 0"
        )
    if spec.source == "synthetic":
        from binax.data.synthetic import SyntheticDataset  # imports jax

        return SyntheticDataset(spec, seed=seed, process_index=process_index, process_count=process_count,
                                **synthetic_keys)
    given_synthetic = sorted(k for k, v in synthetic_keys.items() if v is not None)
    if given_synthetic:
        raise ConfigError(
            f"data.{given_synthetic[0]}={synthetic_keys[given_synthetic[0]]!r} is only for name='synthetic'; "
            f"dataset {config.name!r} has its own shape and classes"
        )
    if spec.source == "tfds":
        from binax.data.tfds_pipeline import TfdsDataset  # imports TensorFlow

        return TfdsDataset(spec, shuffle_buffer=int(config.shuffle_buffer), **common)
    return ArrayDataset(spec, validation_holdout=int(holdout), **common)
