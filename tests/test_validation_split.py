"""The validation split (``data.validation_holdout``): a fixed hold-out of the training
images that training never sees, reported beside the test accuracy, for choosing settings
without reading the test set."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

import binax.data as bd
from binax import train
from binax.errors import ConfigError
from binax.train import config_check
from configs import digits_mlp, recipe

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _write_idx(directory, stem, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    (directory / (stem + ".gz")).write_bytes(gzip.compress(header + array.astype(">u1").tobytes()))


@pytest.fixture(scope="module")
def numbered_dir(tmp_path_factory):
    """An IDX dataset of 40 train / 8 test 28x28 images whose pixel (0, 0) is the image's
    index in its file, so a batch says which images it holds."""
    directory = tmp_path_factory.mktemp("numbered")
    for split, n in (("train", 40), ("t10k", 8)):
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 0] = np.arange(n)
        _write_idx(directory, f"{split}-images-idx3-ubyte", images)
        _write_idx(directory, f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    return directory


def _dataset(directory, holdout, seed=0):
    config = dict(name="mnist", data_dir=str(directory), normalize="unit", augment=False, validation_holdout=holdout)
    return bd.create(config, seed=seed)


def _indices(batches):
    """The file indices of the real (mask 1, or all for train) images in ``batches``."""
    out = []
    for b in batches:
        keep = b["mask"] > 0 if "mask" in b else np.ones(len(b["label"]), bool)
        out += np.rint(b["image"][keep, 0, 0, 0] * 255).astype(int).tolist()
    return out


def test_the_last_images_are_held_out_and_never_trained_on(numbered_dir):
    ds = _dataset(numbered_dir, 12)
    assert (ds.num_train, ds.num_validation, ds.num_test) == (28, 12, 8)
    assert _indices(ds.eval_batches(5, "validation")) == list(range(28, 40))
    trained = set()
    for epoch in range(3):
        trained |= set(_indices(ds.train_batches(epoch, 4)))
    assert trained == set(range(28))  # every kept image, none of the held-out ones
    # The same images for every seed: the cut is by position, not drawn.
    assert _indices(_dataset(numbered_dir, 12, seed=7).eval_batches(40, "validation")) == list(range(28, 40))


def test_no_holdout_trains_on_everything_and_has_no_validation_split(numbered_dir):
    ds = _dataset(numbered_dir, 0)
    assert (ds.num_train, ds.num_validation) == (40, 0)
    with pytest.raises(ConfigError, match="no validation split; set data.validation_holdout"):
        ds.eval_batches(5, "validation")


@pytest.mark.parametrize("bad", [-1, 40, 41, 1.5, True, "10"])
def test_bad_holdout_is_a_one_line_error_naming_it(numbered_dir, bad):
    with pytest.raises(ConfigError, match=r"data\.validation_holdout=") as info:
        _dataset(numbered_dir, bad)
    assert "\n" not in str(info.value) and repr(bad) in str(info.value)


def test_holdout_is_refused_where_binax_cannot_split():
    config = bd.default_config()
    config.update(name="synthetic", validation_holdout=100)
    with pytest.raises(ConfigError, match=r"data\.validation_holdout=100 applies to the in-memory datasets"):
        bd.create(config, seed=0)


def test_config_check_rejects_a_negative_holdout_before_the_run():
    config = digits_mlp.get_config()
    config.data.validation_holdout = -5
    with pytest.raises(ConfigError, match=r"data\.validation_holdout=-5 must be an integer >= 0"):
        config_check.validate(config)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist is not installed")
def test_recipes_hold_out_fashion_mnists_last_10000_training_images():
    config = recipe.get_config("method=bnn")
    assert config.data.validation_holdout == recipe.HOLDOUT == 10_000
    ds = bd.create(config.data, seed=0)
    assert (ds.num_train, ds.num_validation, ds.num_test) == (50_000, 10_000, 10_000)
    images, labels = bd.load_arrays("fashion_mnist", "train")
    first = next(iter(ds.eval_batches(1000, "validation")))
    np.testing.assert_array_equal(first["label"], labels[50_000:51_000])
    assert recipe.get_config("method=bnn,holdout=0").data.validation_holdout == 0
    with pytest.raises(ConfigError, match="holdout=5 applies to dataset=fashion_mnist"):
        recipe.get_config("method=bnn,dataset=cifar10,holdout=5")


@pytest.mark.slow
def test_a_run_reports_validation_beside_test(tmp_path):
    config = digits_mlp.get_config()
    config.model.widths = (32, 32)
    config.update(num_epochs=2, batch_size=300, eval_batch_size=300)
    config.data.validation_holdout = 300
    summary = train.train_and_evaluate(config, str(tmp_path))
    final = json.load(open(tmp_path / "final.json"))
    assert final["validation_accuracy"] == summary["validation_accuracy"]
    assert 0.0 <= final["validation_accuracy"] <= 1.0 and "test_accuracy" in final
    # The figure is the final model's accuracy on the held-out images, not the test images.
    model, variables, _, _ = train.restore_variables(str(tmp_path), step="latest")
    ds = bd.create(config.data, seed=config.seed)
    result = train.evaluate(model, variables, ds.eval_batches(300, "validation"))
    assert result.count == 300
    assert final["validation_accuracy"] == pytest.approx(result.accuracy, abs=1e-6)
    records = [r for r in train.read_metrics(str(tmp_path / "metrics.jsonl")) if "test/accuracy" in r]
    assert [("validation/accuracy" in r) for r in records] == [True, True]  # both epochs' evaluations


def test_the_best_checkpoint_is_chosen_on_validation_when_there_is_one():
    from binax.train import evaluation

    assert evaluation.selection_accuracy({"test/accuracy": 0.9, "validation/accuracy": 0.5}) == 0.5
    assert evaluation.selection_accuracy({"test/accuracy": 0.9}) == 0.9
