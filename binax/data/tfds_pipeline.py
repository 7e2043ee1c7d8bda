"""tensorflow-datasets pipelines (CIFAR-10/100, ImageNet, MNIST-family, any image builder).

TensorFlow is imported only when a tfds dataset is created, and is kept off the GPUs
(JAX owns them).

Determinism and resume. Each process reads its own ``1/P`` of the split
(``tfds.even_splits``). For epoch ``e`` the process builds a fresh pipeline whose file
order (``ReadConfig.shuffle_seed``) and shuffle buffer are seeded from
``(seed, e, process_index)``; ``tf.data`` keeps element order deterministic. Elements are
numbered *after* the shuffle, and every random augmentation of element ``i`` is a
stateless op seeded with ``(augment_seed(seed, e, process_index), i)``. Resuming at step
``k`` skips ``k * B_local`` numbered elements *before* they are decoded, so it yields
exactly the batches ``k, k+1, ...`` of the uninterrupted epoch.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from binax.data.spec import Dataset, Spec, normalize, pad_batch
from binax.errors import ConfigError, MissingDataError, MissingDependencyError

# Inception-style crop (Szegedy et al., 2015) as in torchvision's RandomResizedCrop.
_CROP_AREA = (0.08, 1.0)
_CROP_ASPECT = (3 / 4, 4 / 3)
# Evaluation crop: the central square of side 224/256 of the shorter image side.
_EVAL_CROP_FRACTION = 224 / 256


def import_tf():
    """Imports TensorFlow and tfds, hiding the GPUs from TensorFlow. Returns ``(tf, tfds)``."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise MissingDependencyError(
            "tfds datasets need tensorflow and tensorflow-datasets: "
            "`pip install 'binax[tfds]'` (tensorflow-cpu is enough)"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialized its devices (someone else imported it first)
    return tf, tfds


def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


class TfdsDataset(Dataset):
    """A tfds image-classification dataset behind the :class:`Dataset` contract."""

    def __init__(self, spec: Spec, *, data_dir: Optional[str], seed: int,
                 augment: bool, normalize_mode: str, shuffle_buffer: int,
                 process_index: int, process_count: int):
        tf, tfds = import_tf()
        self._tf, self._tfds = tf, tfds
        try:
            self._builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ConfigError(
                f"tfds has no dataset {spec.tfds_name!r} (from name {spec.name!r}); see "
                "https://www.tensorflow.org/datasets/catalog/overview"
            ) from None
        self._data_dir = data_dir or tfds.core.constants.DATA_DIR
        if spec.image_shape is None:
            spec = self._generic_spec(spec)
        if augment and not (spec.crop_pad or spec.flip or spec.inception_crop):
            raise ConfigError(f"binax defines no augmentation for {spec.name!r}; set augment=False")
        num_train = self._split_sizes(spec, spec.train_split, 1)[0]
        num_test = self._split_sizes(spec, spec.test_split, 1)[0]
        super().__init__(spec, num_train=num_train, num_test=num_test, seed=seed,
                         process_index=process_index, process_count=process_count)
        self.augment = augment
        self.normalize_mode = normalize_mode
        self.shuffle_buffer = shuffle_buffer
        # Batches also carry 'id' (the examples' file_name: bytes), for tests and audits
        # of the sharding; only builders with a file_name feature (ImageNet) have one.
        self.with_ids = False
        # False: batches keep uint8 pixels in [0, 255] (for a consumer that normalizes on
        # the device; benchmarks/input_pipeline.py measures what that saves the host).
        self.normalize_on_host = True

    # -- metadata -------------------------------------------------------------------------

    def _generic_spec(self, spec: Spec) -> Spec:
        """Fills shape and classes of an unregistered builder from its features."""
        import dataclasses

        info = self._builder.info
        features = info.features
        shape = getattr(features["image"], "shape", None) if "image" in features else None
        num_classes = getattr(features["label"], "num_classes", None) if "label" in features \
            else None
        if shape is None or None in shape or num_classes is None:
            raise ConfigError(
                f"{spec.name!r}: binax reads tfds builders with a fixed-shape 'image' and a "
                f"ClassLabel 'label' feature; this one has {features}"
            )
        # Builders without a 'test' split (ImageNet-like) evaluate on 'validation'.
        test = "validation" if info.splits and "test" not in info.splits else "test"
        return dataclasses.replace(spec, image_shape=tuple(shape), num_classes=num_classes,
                                   test_split=test)

    def _split_sizes(self, spec: Spec, split: str, count: int) -> list[int]:
        """Example counts of the ``count`` even shards of ``split`` (as read, not metadata).

        Reading the cardinality of the pipeline itself (known without reading a record)
        keeps the counts true under ``tfds.testing.mock_data`` as well.
        """
        shards = self._shards(split, count, drop_remainder=False)
        sizes = []
        for shard in shards:
            ds = self._as_dataset(spec, shard, shuffle_seed=None)
            n = int(ds.cardinality().numpy())
            if n < 0:  # unknown: count (only for exotic builders)
                n = int(ds.reduce(0, lambda c, _: c + 1).numpy())
            sizes.append(n)
        return sizes

    def _shards(self, split: str, count: int, drop_remainder: bool):
        if count == 1:
            return [split]
        return self._tfds.even_splits(split, n=count, drop_remainder=drop_remainder)

    def _as_dataset(self, spec: Spec, split, shuffle_seed: Optional[int]):
        tfds = self._tfds
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
        try:
            return self._builder.as_dataset(
                split=split,
                shuffle_files=shuffle_seed is not None,
                read_config=read_config,
                # Decode in our own map, after resume skipping, so skipped images are
                # never decoded, and so ImageNet can decode only its crop window.
                decoders={"image": tfds.decode.SkipDecoding()},
            )
        except AssertionError as e:  # tfds's "could not find data" for unprepared sets
            if "could not find data" not in str(e):
                raise
            hint = spec.install_hint.format(tfds_name=spec.tfds_name, data_dir=self._data_dir)
            raise MissingDataError(
                f"tfds dataset {spec.tfds_name!r} is not prepared in {self._data_dir!r}. "
                f"{hint}"
            ) from None

    # -- preprocessing --------------------------------------------------------------------

    def _decode(self, encoded):
        tf = self._tf
        c = self.image_shape[2]
        image = tf.io.decode_image(encoded, channels=c, expand_animations=False)
        image.set_shape((None, None, c))
        return image

    def _train_image(self, encoded, seed):
        """Decoded (and, with ``augment``, randomly transformed) float32 pixels in [0, 255]."""
        tf = self._tf
        spec = self.spec
        h, w, c = self.image_shape
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if spec.inception_crop:
            if not self.augment:
                return self._eval_image(encoded)
            image = self._inception_crop(encoded, crop_seed)
        else:
            image = tf.cast(self._decode(encoded), tf.float32)
            image = tf.reshape(image, (h, w, c))
            if self.augment and spec.crop_pad:
                p = spec.crop_pad
                image = tf.pad(image, [[p, p], [p, p], [0, 0]])
                image = tf.image.stateless_random_crop(image, (h, w, c), seed=crop_seed)
        if self.augment and spec.flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return image

    def _inception_crop(self, encoded, seed):
        """A random crop of 8%..100% of the area, aspect 3/4..4/3, resized to the output.

        The crop window is drawn with ``stateless_sample_distorted_bounding_box`` (the whole
        image if no window fits in 10 tries) and only that window of the JPEG is decoded.
        The resize is plain bilinear, as big_vision's ``inception_crop``: antialiasing
        costs as much as decoding (docs/performance.md), and a random crop's scale varies
        anyway; evaluation keeps it.
        """
        tf = self._tf
        h, w, c = self.image_shape
        shape = tf.image.extract_jpeg_shape(encoded)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.zeros((1, 0, 4), tf.float32),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=_CROP_ASPECT,
            area_range=_CROP_AREA,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=c)
        return tf.image.resize(image, (h, w), method="bilinear", antialias=False)

    def _eval_image(self, encoded):
        tf = self._tf
        h, w, c = self.image_shape
        if not self.spec.inception_crop:
            return tf.reshape(tf.cast(self._decode(encoded), tf.float32), (h, w, c))
        # Resize-and-center-crop: the central square of side 224/256 * shorter side,
        # resized to (h, w) -- the same pixels as resizing to 256 and cropping 224.
        shape = tf.image.extract_jpeg_shape(encoded)
        side = tf.cast(
            tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * _EVAL_CROP_FRACTION, tf.int32)
        side = tf.maximum(side, 1)
        window = tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=c)
        return tf.image.resize(image, (h, w), method="bilinear", antialias=True)

    def _finish(self, image, example):
        """The example as batched: pixels rounded to uint8 (a quarter of the bytes to copy
        into the batch; the decoded JPEG had 8 bits anyway), normalized per batch."""
        tf = self._tf
        out = {
            "image": tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8),
            "label": tf.cast(example["label"], tf.int32),
        }
        if self.with_ids:
            out["id"] = example["file_name"]
        return out

    def _normalize_batch(self, batch):
        """Float32 model inputs of a batch of uint8 pixels: one vectorized op per batch."""
        tf = self._tf
        if not self.normalize_on_host:
            return batch
        image = tf.cast(batch["image"], tf.float32)
        return {**batch, "image": tf.cast(normalize(image, self.spec, self.normalize_mode), tf.float32)}

    def _options(self):
        tf = self._tf
        options = tf.data.Options()
        options.deterministic = True
        return options

    # -- iterators ------------------------------------------------------------------------

    def train_batches(self, epoch: int, batch_size: int, start_step: int = 0):
        tf, tfds = self._tf, self._tfds
        local, steps = self._check_train_args(epoch, batch_size, start_step)
        words = (self.seed, int(epoch), self.process_index)
        shuffle_seed = derive_seed(*words, _SHUFFLE_STREAM)
        augment_seed = tf.constant(derive_seed(*words, _AUGMENT_STREAM), tf.int64)
        shard = self._shards(self.spec.train_split, self.process_count, drop_remainder=True)
        ds = self._as_dataset(self.spec, shard[self.process_index], shuffle_seed)
        # Op-level seeds must fit in int64; tf.data mixes them with the graph seed.
        buffer = max(1, min(self.shuffle_buffer, self.num_train))
        ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(steps * local).enumerate().skip(start_step * local)

        def example(i, ex):
            seed = tf.stack([augment_seed, tf.cast(i, tf.int64)])
            return self._finish(self._train_image(ex["image"], seed), ex)

        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local, drop_remainder=True).map(self._normalize_batch)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        return iter(tfds.as_numpy(ds.with_options(self._options())))

    def eval_batches(self, batch_size: int, split: str = "test"):
        tf, tfds = self._tf, self._tfds
        local = self.local_batch_size(batch_size)
        self._split_size(split)
        tfds_split = self.spec.train_split if split == "train" else self.spec.test_split
        # Every process yields the same number of batches (the loop runs them in lockstep):
        # enough for the largest shard, with all-padding batches where a shard is short.
        sizes = self._split_sizes(self.spec, tfds_split, self.process_count)
        num_batches = math.ceil(max(sizes) / local)
        shard = self._shards(tfds_split, self.process_count, drop_remainder=False)
        ds = self._as_dataset(self.spec, shard[self.process_index], shuffle_seed=None)
        ds = ds.map(lambda ex: self._finish(self._eval_image(ex["image"]), ex),
                    num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local).map(self._normalize_batch).prefetch(tf.data.AUTOTUNE)
        ds = ds.with_options(self._options())
        return self._padded(tfds.as_numpy(ds), local, num_batches)

    def _padded(self, batches, local, num_batches):
        count = 0
        for batch in batches:
            count += 1
            yield pad_batch(batch, local)
        empty = {
            "image": np.zeros((0,) + self.image_shape,
                              np.float32 if self.normalize_on_host else np.uint8),
            "label": np.zeros((0,), np.int32),
        }
        if self.with_ids:
            empty["id"] = np.zeros((0,), object)
        for _ in range(count, num_batches):
            yield pad_batch(empty, local)
