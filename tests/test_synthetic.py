"""``config.data.name='synthetic'``: batches drawn on the devices, ImageNet-shaped by
default, deterministic and resumable, through the training loop; impossible shapes are
one-line config errors naming the value."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import binax.data
from binax import train
from binax.data import synthetic
from binax.errors import ConfigError
from configs import digits_mlp, recipe

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _create(**keys):
    return binax.data.create({"name": "synthetic", **keys}, seed=3)


def test_defaults_are_imagenet_shaped():
    ds = _create()
    assert ds.image_shape == (224, 224, 3) and ds.num_classes == 1000
    assert (ds.num_train, ds.num_test) == (1_281_167, 50_000)


def test_batches_are_global_device_arrays_deterministic_and_resumable():
    ds = _create(image_shape=(6, 5, 2), num_classes=7, num_train=40, num_test=10)
    batches = list(ds.train_batches(1, 8))
    assert len(batches) == 5
    first = batches[0]
    assert isinstance(first["image"], jax.Array) and first["image"].shape == (8, 6, 5, 2)
    assert first["image"].dtype == np.float32 and first["label"].dtype == np.int32
    # Made where the train step reads it: the batch axis over every device.
    assert first["image"].sharding.is_equivalent_to(synthetic.batch_sharding(), 4)
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    assert labels.min() >= 0 and labels.max() < 7 and len(set(labels.tolist())) > 1
    # The same (seed, epoch) gives the same batches; start_step resumes inside the epoch.
    again = list(ds.train_batches(1, 8, start_step=3))
    np.testing.assert_array_equal(np.asarray(again[0]["image"]), np.asarray(batches[3]["image"]))
    other_epoch = next(ds.train_batches(2, 8))
    assert not np.array_equal(np.asarray(other_epoch["image"]), np.asarray(first["image"]))
    # Evaluation: 10 examples in batches of 8, the padding masked out.
    masks = [np.asarray(b["mask"]) for b in ds.eval_batches(8)]
    assert [m.tolist() for m in masks] == [[1.0] * 8, [1.0] * 2 + [0.0] * 6]


@pytest.mark.parametrize(
    "keys,message",
    [
        (dict(image_shape=(0, 224, 3)), r"data.image_shape=\(0, 224, 3\) must hold three positive integers"),
        (dict(image_shape=(-4, 4, 3)), r"data.image_shape=\(-4, 4, 3\) must hold three positive integers"),
        (dict(image_shape=(224, 224)), r"data.image_shape=\(224, 224\) must be \(height, width, channels\)"),
        (dict(image_shape=(1, 2, 3, 4)), r"data.image_shape=\(1, 2, 3, 4\) must be \(height, width, channels\)"),
        (dict(image_shape=(8.5, 8, 3)), r"data.image_shape=\(8.5, 8, 3\) must hold three positive integers"),
        (dict(num_classes=0), r"data.num_classes=0 must be a positive integer"),
        (dict(num_train=-1), r"data.num_train=-1 must be a positive integer"),
    ],
)
def test_impossible_shapes_are_config_errors_naming_the_value(keys, message):
    with pytest.raises(ConfigError, match=message):
        _create(**keys)


def test_synthetic_keys_are_refused_for_a_real_dataset():
    with pytest.raises(ConfigError, match=r"data.image_shape=\(32, 32, 3\) is only for name='synthetic'"):
        binax.data.create({"name": "digits", "image_shape": (32, 32, 3)}, seed=0)


def test_an_image_smaller_than_the_model_takes_is_a_config_error_naming_it():
    config = recipe.get_config("method=irnet,dataset=imagenet2012,quick")
    config.data.name = "synthetic"
    config.data.image_shape = (16, 16, 3)
    ds = binax.data.create(config.data, seed=0)
    with pytest.raises(ConfigError, match=r"at least 32x32 pixels.*got 16x16"):
        train.build_trainer(config, ds)


def test_trains_and_evaluates_through_the_loop(tmp_path):
    config = digits_mlp.get_config("quick")
    config.data = binax.data.default_config()
    config.data.name = "synthetic"
    config.data.image_shape, config.data.num_classes = (8, 8, 1), 10
    config.data.num_train, config.data.num_test = 64, 20
    config.batch_size, config.eval_batch_size = 16, 8
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["step"] == 4 * config.num_epochs and summary["dataset"] == "synthetic"
    assert np.isfinite(summary["test_loss"]) and 0.0 <= summary["test_accuracy"] <= 1.0


def test_the_command_line_prints_one_error_line_for_an_impossible_shape(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config={ROOT / 'configs' / 'digits_mlp.py'}:quick",
         f"--workdir={tmp_path / 'run'}", "--config.data.name=synthetic", "--config.data.image_shape=(0,8,1)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1] == "error: data.image_shape=(0, 8, 1) must hold three positive integers (height, width, channels)"
    assert "Traceback" not in result.stderr
