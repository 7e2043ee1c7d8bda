"""binax.data: IDX parsing, in-memory and tfds datasets, determinism, resume, sharding."""

import gzip
import os
import struct

import numpy as np
import pytest

import binax.data as bd
from binax.errors import DataError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist is not installed")


def _config(name, **fields):
    config = bd.default_config()
    config.name = name
    for key, value in fields.items():
        config[key] = value
    return config


def _idx_bytes(array, type_code):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx_dir(directory, images, labels, split="train", compress=True):
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    for stem, array in zip(stems, (images, labels)):
        data = _idx_bytes(array, 0x08)
        if compress:
            (directory / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)


def _collect(iterator):
    batches = list(iterator)
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


# -- IDX files --------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_reads_header_shape_and_values(tmp_path, compress):
    images = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)
    data = _idx_bytes(images, 0x08)
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    out = bd.load_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 2, 5)
    np.testing.assert_array_equal(out, images)


def test_load_idx_converts_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000], [2**31 - 1, 0, -(2**31)]], dtype=np.int32)
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(values, 0x0C))
    out = bd.load_idx(path)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


def test_load_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad IDX magic 12340801"):
        bd.load_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 3), np.uint8), 0x08)[:-1])
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*11 bytes"):
        bd.load_idx(short)


# -- in-memory datasets -----------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_shapes_and_normalization_constants():
    x_train, y_train = bd.load_arrays("fashion_mnist", "train")
    x_test, y_test = bd.load_arrays("fashion_mnist", "test")
    assert x_train.shape == (60000, 28, 28, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28, 1) and y_test.shape == (10000,)
    assert y_train.dtype == np.int32 and set(np.unique(y_train)) == set(range(10))
    # Mean and std of the pixels on the [0, 1] scale, from their histogram.
    p = np.bincount(x_train.ravel(), minlength=256) / x_train.size
    v = np.arange(256) / 255.0
    mean = (p * v).sum()
    std = np.sqrt((p * (v - mean) ** 2).sum())
    spec = bd.get_spec("fashion_mnist")
    assert abs(mean - spec.mean[0]) < 5e-4 and abs(std - spec.std[0]) < 5e-4
    ds = bd.create(_config("fashion_mnist"), seed=0)
    assert (ds.num_train, ds.num_test, ds.image_shape, ds.num_classes) == (60000, 10000, (28, 28, 1), 10)
    assert ds.steps_per_epoch(128) == 468


@needs_fashion
@pytest.mark.parametrize("mode", ["mean_std", "unit", "sym"])
def test_first_batch_is_the_permuted_normalized_images(mode):
    ds = bd.create(_config("fashion_mnist", normalize=mode), seed=3)
    batch = next(ds.train_batches(epoch=2, batch_size=64))
    x, y = bd.load_arrays("fashion_mnist", "train")
    index = np.random.default_rng([3, 2]).permutation(60000)[:64]
    u = x[index].astype(np.float64) / 255.0
    expected = {"mean_std": (u - 0.2860) / 0.3530, "unit": u, "sym": 2 * u - 1}[mode]
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(batch["label"], y[index])


def test_digits_split_constants_and_eval_coverage():
    x_train, _ = bd.load_arrays("digits", "train")
    x_test, y_test = bd.load_arrays("digits", "test")
    assert x_train.shape == (1500, 8, 8, 1) and x_test.shape == (297, 8, 8, 1)
    assert x_train.max() == 16
    spec = bd.get_spec("digits")
    assert abs((x_train / 16).mean() - spec.mean[0]) < 5e-4
    assert abs((x_train / 16).std() - spec.std[0]) < 5e-4
    ds = bd.create(_config("digits", normalize="unit"), seed=0)
    out = _collect(ds.eval_batches(100))
    assert out["image"].shape == (3, 100, 8, 8, 1)
    mask = out["mask"].reshape(-1)
    np.testing.assert_array_equal(mask, np.arange(300) < 297)
    np.testing.assert_array_equal(out["label"].reshape(-1)[:297], y_test)
    np.testing.assert_allclose(out["image"].reshape(-1, 8, 8, 1)[:297], x_test / 16, atol=1e-6)
    assert not out["image"].reshape(-1, 8, 8, 1)[297:].any()


@pytest.mark.parametrize("augment", [False, True])
def test_in_memory_order_is_deterministic_and_resumable(augment):
    ds = bd.create(_config("digits", augment=augment), seed=5)
    assert ds.steps_per_epoch(64) == 23
    first = _collect(ds.train_batches(0, 64))
    again = _collect(bd.create(_config("digits", augment=augment), seed=5).train_batches(0, 64))
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert first["image"].shape == (23, 64, 8, 8, 1)
    resumed = _collect(ds.train_batches(0, 64, start_step=9))
    for key in first:
        np.testing.assert_array_equal(resumed[key], first[key][9:])
    other_epoch = _collect(ds.train_batches(1, 64))
    other_seed = _collect(bd.create(_config("digits", augment=augment), seed=6).train_batches(0, 64))
    assert not np.array_equal(first["label"], other_epoch["label"])
    assert not np.array_equal(first["label"], other_seed["label"])
    assert list(ds.train_batches(0, 64, start_step=23)) == []


def test_in_memory_epoch_visits_distinct_examples():
    ds = bd.create(_config("digits", normalize="unit"), seed=0)
    x, _ = bd.load_arrays("digits", "train")
    images = _collect(ds.train_batches(0, 100))["image"].reshape(1500, -1)
    # Every training image appears exactly as often in the epoch as in the split.
    seen = np.sort(np.round(images * 16).astype(np.uint8).view("S64").ravel())
    np.testing.assert_array_equal(seen, np.sort(x.reshape(1500, -1).view("S64").ravel()))


@pytest.mark.parametrize("augment", [False, True])
def test_in_memory_process_shards_concatenate_to_global_batch(augment):
    config = _config("digits", augment=augment)
    whole = _collect(bd.create(config, seed=1).train_batches(3, 60))
    parts = [_collect(bd.create(config, seed=1, process_index=p, process_count=3)
                      .train_batches(3, 60)) for p in range(3)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), whole[key])
    evals = [_collect(bd.create(config, seed=1, process_index=p, process_count=3)
                      .eval_batches(60)) for p in range(3)]
    mask = np.concatenate([e["mask"] for e in evals], axis=1).reshape(-1)
    labels = np.concatenate([e["label"] for e in evals], axis=1).reshape(-1)
    assert mask.sum() == 297 and not mask[297:].any()
    np.testing.assert_array_equal(labels[:297], bd.load_arrays("digits", "test")[1])


def test_random_crop_flip_matches_pad_slice_mirror():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(6, 5, 7, 2), dtype=np.uint8)
    offsets = rng.integers(0, 5, size=(6, 2))
    flips = np.array([True, False, True, False, False, True])
    out = bd.random_crop_flip(images, offsets, flips, pad=2)
    for i in range(6):
        padded = np.pad(images[i], ((2, 2), (2, 2), (0, 0)))
        expected = padded[offsets[i, 0]:offsets[i, 0] + 5, offsets[i, 1]:offsets[i, 1] + 7]
        np.testing.assert_array_equal(out[i], expected[:, ::-1] if flips[i] else expected)


def test_idx_dataset_from_config_dir_gz_and_raw(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, compress in (("train", 20, True), ("test", 7, False)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx_dir(tmp_path, images, (np.arange(n) % 10).astype(np.uint8), split, compress)
    ds = bd.create(_config("mnist", data_dir=str(tmp_path)), seed=0)
    assert (ds.num_train, ds.num_test) == (20, 7)
    x, y = bd.load_arrays("mnist", "test", data_dir=tmp_path)
    assert x.shape == (7, 28, 28, 1) and list(y) == list(range(7))


# -- errors -----------------------------------------------------------------------------


def test_labels_out_of_range_fail_at_load_naming_the_dataset_value_and_range(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.array([0, 3, 200, 9, 1], np.uint8)
    for split in ("train", "test"):
        _write_idx_dir(tmp_path, images, labels if split == "train" else labels % 10, split)
    with pytest.raises(DataError) as raised:
        bd.create(_config("mnist", data_dir=str(tmp_path)), seed=0)
    message = str(raised.value)
    assert "dataset 'mnist' (train, " in message and "train-labels-idx1-ubyte" in message
    assert "has label 200 at index 2" in message and "labels must be in [0, 10)" in message


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        bd.create(_config("fashion_mnist", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(FileNotFoundError, match="config.data.data_dir"):
        bd.create(_config("mnist"), seed=0)


def test_bad_names_and_arguments_raise_value_errors():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar11'.*'fashion_mnist'"):
        bd.create(_config("cifar11"), seed=0)
    assert {"fashion_mnist", "mnist", "digits", "cifar10", "cifar100", "imagenet2012"} <= set(bd.names())
    with pytest.raises(ValueError, match="unknown data config field.*'normalise'"):
        bd.create({"name": "digits", "normalise": "unit"}, seed=0)
    with pytest.raises(ValueError, match="normalize='minmax'"):
        bd.create(_config("digits", normalize="minmax"), seed=0)
    with pytest.raises(ValueError, match="process_index=2"):
        bd.create(_config("digits"), seed=0, process_index=2, process_count=2)
    ds = bd.create(_config("digits"), seed=0, process_count=2)
    with pytest.raises(ValueError, match="not divisible by process_count=2"):
        ds.train_batches(0, 33)
    with pytest.raises(ValueError, match="start_step=24"):
        ds.train_batches(0, 64, start_step=24)
    with pytest.raises(ValueError, match="larger than the 1500"):
        ds.steps_per_epoch(2000)
    with pytest.raises(ValueError, match="split='val'"):
        ds.eval_batches(10, split="val")


# -- tfds -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _crop_flip_candidates(plain, pad):
    """Every pad-crop (and mirror) of one image: the set an augmented image must lie in."""
    h, w, _ = plain.shape
    padded = np.pad(plain, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield crop
            yield crop[:, ::-1]


@pytest.mark.slow
def test_tfds_cifar10_mock_shapes_and_deterministic_augmentation(tfds):
    with tfds.testing.mock_data(num_examples=24):
        plain = bd.create(_config("cifar10", augment=False, normalize="unit"), seed=7)
        aug = bd.create(_config("cifar10", normalize="unit"), seed=7)  # augment by default
        assert (aug.image_shape, aug.num_classes, aug.num_train) == ((32, 32, 3), 10, 24)
        batches = _collect(aug.train_batches(0, 8))
        assert batches["image"].shape == (3, 8, 32, 32, 3) and batches["label"].dtype == np.int32
        again = _collect(aug.train_batches(0, 8))
        resumed = _collect(aug.train_batches(0, 8, start_step=1))
        reference = _collect(plain.train_batches(0, 8))
        other_epoch = _collect(aug.train_batches(1, 8))
        evals = _collect(aug.eval_batches(10))
    np.testing.assert_array_equal(batches["image"], again["image"])
    np.testing.assert_array_equal(resumed["image"], batches["image"][1:])
    np.testing.assert_array_equal(resumed["label"], batches["label"][1:])
    assert not np.array_equal(batches["image"], other_epoch["image"])
    # Same shuffle, so the augmented image i is a pad-crop/mirror of plain image i.
    np.testing.assert_array_equal(batches["label"], reference["label"])
    flat_aug = batches["image"].reshape(-1, 32, 32, 3)
    flat_plain = reference["image"].reshape(-1, 32, 32, 3)
    assert not np.array_equal(flat_aug, flat_plain)
    for a, p in zip(flat_aug, flat_plain):
        assert any(np.array_equal(a, c) for c in _crop_flip_candidates(p, 4))
    assert evals["image"].shape == (3, 10, 32, 32, 3)
    np.testing.assert_array_equal(evals["mask"].reshape(-1), np.arange(30) < 24)


@pytest.mark.slow
def test_tfds_imagenet_mock_crops_to_224(tfds):
    with tfds.testing.mock_data(num_examples=6):
        ds = bd.create(_config("imagenet2012"), seed=0)
        assert (ds.image_shape, ds.num_classes) == ((224, 224, 3), 1000)
        first = _collect(ds.train_batches(0, 2))
        second = _collect(ds.train_batches(0, 2, start_step=1))
        evals = _collect(ds.eval_batches(4))
    assert first["image"].shape == (3, 2, 224, 224, 3) and first["image"].dtype == np.float32
    np.testing.assert_array_equal(second["image"], first["image"][1:])
    assert evals["image"].shape == (2, 4, 224, 224, 3)
    np.testing.assert_array_equal(evals["mask"].reshape(-1), np.arange(8) < 6)
    assert np.isfinite(first["image"]).all() and np.isfinite(evals["image"]).all()


def test_tfds_unprepared_dataset_says_how_to_build_it(tfds, tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
        bd.create(_config("cifar10", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(FileNotFoundError, match="python -m binax.data.imagenet_archive --manual_dir DIR"):
        bd.create(_config("imagenet2012", data_dir=str(tmp_path)), seed=0)
    with pytest.raises(ValueError, match="tfds has no dataset 'no_such_builder'"):
        bd.create(_config("tfds:no_such_builder", normalize="unit"), seed=0)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tfds, tmp_path_factory):
    """A real (file-backed) tfds dataset: image pixels hold the example's id."""

    class BinaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(4, 4, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 50),
                    "test": self._generate_examples(100, 13)}

        def _generate_examples(self, first, count):
            for i in range(first, first + count):
                yield i, {"image": np.full((4, 4, 1), i, np.uint8), "label": i % 3}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    BinaxTinyImages(data_dir=data_dir).download_and_prepare()
    return data_dir


def _ids(images):
    return np.round(images[..., 0, 0, 0] * 255).astype(int)


def test_tfds_files_shard_disjointly_and_resume(tiny_tfds_dir):
    config = _config("tfds:binax_tiny_images", data_dir=tiny_tfds_dir, normalize="unit")
    with pytest.raises(ValueError, match="mean_std"):
        bd.create(_config("tfds:binax_tiny_images", data_dir=tiny_tfds_dir), seed=0)
    whole = bd.create(config, seed=2)
    assert (whole.num_train, whole.num_test, whole.image_shape) == (50, 13, (4, 4, 1))
    order = _ids(_collect(whole.train_batches(0, 10))["image"]).ravel()
    assert sorted(order) == list(range(50))
    again = _ids(_collect(bd.create(config, seed=2).train_batches(0, 10))["image"]).ravel()
    np.testing.assert_array_equal(order, again)
    assert not np.array_equal(order, _ids(_collect(whole.train_batches(1, 10))["image"]).ravel())
    resumed = _ids(_collect(whole.train_batches(0, 10, start_step=3))["image"]).ravel()
    np.testing.assert_array_equal(resumed, order[30:])
    parts = [bd.create(config, seed=2, process_index=p, process_count=2) for p in range(2)]
    local = [_collect(p.train_batches(0, 10)) for p in parts]
    assert all(l["image"].shape == (5, 5, 4, 4, 1) for l in local)
    ids = [set(_ids(l["image"]).ravel()) for l in local]
    assert len(ids[0]) == len(ids[1]) == 25 and not ids[0] & ids[1]
    evals = [_collect(p.eval_batches(4)) for p in parts]
    assert evals[0]["image"].shape == evals[1]["image"].shape == (4, 2, 4, 4, 1)
    seen = np.concatenate([_ids(e["image"])[e["mask"] > 0] for e in evals])
    assert sorted(seen) == list(range(100, 113))
    assert sum(e["mask"].sum() for e in evals) == 13
