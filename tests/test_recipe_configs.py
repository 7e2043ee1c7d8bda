"""Every recipe (method x dataset, full and ``:quick``) builds its model and optimizer for
its dataset's real size, and the ImageNet learning rate follows the batch size."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import binax.data
from binax import train
from binax.errors import ConfigError
from configs import recipe

# Training images per dataset: the steps per epoch the schedules are built for.
NUM_TRAIN = {"fashion_mnist": 60_000, "cifar10": 50_000, "imagenet2012": 1_281_167}


def _steps_per_epoch(config, dataset):
    steps = NUM_TRAIN[dataset] // config.batch_size
    return min(steps, config.max_steps_per_epoch) if config.max_steps_per_epoch else steps


@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("dataset", recipe.DATASETS)
@pytest.mark.parametrize("method", list(recipe.METHODS))
def test_every_recipe_builds_its_model_and_schedules(method, dataset, quick):
    config = recipe.get_config(f"method={method},dataset={dataset}" + (",quick" if quick else ""))
    steps = _steps_per_epoch(config, dataset)
    # create_optimizer validates the schedules: warm-up shorter than training, decays.
    tx, schedules = train.create_optimizer(
        config.optimizer, config.binary_optimizer, steps_per_epoch=steps, num_epochs=config.num_epochs
    )
    total = steps * config.num_epochs
    lr = schedules["learning_rate"]
    peak = config.optimizer.learning_rate
    values = np.asarray([float(lr(s)) for s in (0, total // 2, total - 1)])
    assert np.all(np.isfinite(values)) and np.all(values >= 0) and values.max() <= peak * (1 + 1e-6)
    if config.optimizer.warmup_epochs:
        # The warm-up ends inside the run and reaches the peak.
        warmup = round(config.optimizer.warmup_epochs * steps)
        assert 0 < warmup < total
        assert float(lr(warmup)) == pytest.approx(peak, rel=1e-5)
    model = train.create_model(config.model)
    spec = binax.data.get_spec(config.data.name)
    assert model.num_classes == spec.num_classes
    if quick:
        assert config.num_epochs == 1 and config.max_steps_per_epoch == 200


@pytest.mark.parametrize("method", ["irnet", "bireal"])
def test_imagenet_quick_builds_the_trainer_without_training(method):
    """The quick ImageNet recipes build their whole trainer (model, optimizer, step) at
    224x224 by shapes only; before the schedule compression, irnet's 4-epoch warm-up
    was longer than its 200 steps and stopped with a traceback."""
    config = recipe.get_config(f"method={method},dataset=imagenet2012,quick")
    ds = binax.data.create({"name": "synthetic"}, seed=0)  # ImageNet-shaped, 1000 classes
    trainer = train.build_trainer(config, ds)
    assert trainer.steps_per_epoch == 200
    state = jax.eval_shape(trainer.init)
    batch = {
        "image": jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((8,), jnp.int32),
    }
    _, metrics = jax.eval_shape(trainer.train_fn, state, batch)
    assert metrics["loss"].shape == ()


@pytest.mark.parametrize(
    "method,official_lr,official_batch", [("irnet", 0.8, 2048), ("bireal", 1e-3, 512), ("reactnet", 1e-3, 512)]
)
def test_imagenet_learning_rate_follows_the_batch_size_given_after_get_config(method, official_lr, official_batch):
    config = recipe.get_config(f"method={method},dataset=imagenet2012")
    assert config.batch_size == 256
    assert config.optimizer.learning_rate == pytest.approx(official_lr * 256 / official_batch, rel=1e-12)
    # As `--config.batch_size=2048` does: set after get_config, on the locked config.
    config.lock()
    config.batch_size = official_batch
    assert config.optimizer.learning_rate == pytest.approx(official_lr, rel=1e-12)
    config.batch_size = 2048
    expected = official_lr * 2048 / official_batch
    assert config.optimizer.learning_rate == pytest.approx(expected, rel=1e-12)
    # What the trainer reads and records is the resolved value.
    assert config.to_dict()["optimizer"]["learning_rate"] == pytest.approx(expected, rel=1e-12)
    _, schedules = train.create_optimizer(config.optimizer, steps_per_epoch=100, num_epochs=config.num_epochs)
    warmup = round(config.optimizer.warmup_epochs * 100)
    assert float(schedules["learning_rate"](warmup)) == pytest.approx(expected, rel=1e-5)


def _config_from_flags(monkeypatch, *flags_given):
    """The config ``experiments.run`` would get (ml_collections' flag, which reads sys.argv)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={recipe.__file__}:method=irnet,dataset=imagenet2012", *flags_given]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
    values(argv)
    return values.config


def test_irnet_at_the_official_batch_gives_the_official_0_8_through_the_command_line_flags(monkeypatch):
    assert _config_from_flags(monkeypatch, "--config.batch_size=2048").optimizer.learning_rate == pytest.approx(0.8, rel=1e-12)
    # An explicit learning rate wins, in either order.
    for given in (["--config.batch_size=2048", "--config.optimizer.learning_rate=0.05"],
                  ["--config.optimizer.learning_rate=0.05", "--config.batch_size=2048"]):
        assert _config_from_flags(monkeypatch, *given).optimizer.learning_rate == 0.05


def test_a_warmup_longer_than_training_is_a_config_error():
    config = recipe.get_config("method=irnet,dataset=imagenet2012")
    with pytest.raises(ConfigError, match="warmup_epochs=4.0 gives 400 warm-up steps; it must be >= 0 and shorter than the 200"):
        train.create_optimizer(config.optimizer, steps_per_epoch=100, num_epochs=2)
