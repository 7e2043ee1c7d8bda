"""Every config file loads, with and without ``:quick``, and names a model, dataset and
optimizer that fit together (checked by shapes only: nothing is compiled or trained)."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

import binax.data
from binax import train
from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)


def test_default_and_examples_exist():
    assert {"default", "digits_mlp"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_config_builds_a_consistent_model_and_optimizer(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    spec = binax.data.get_spec(config.data.name)
    model = train.create_model(config.model)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((2, *spec.image_shape)), train=False))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *spec.image_shape)), train=False), variables)
    assert logits.shape == (2, spec.num_classes)
    tx, _ = train.create_optimizer(
        config.optimizer, config.binary_optimizer, steps_per_epoch=10, num_epochs=config.num_epochs
    )
    jax.eval_shape(tx.init, variables["params"])
    if arg == "quick":
        assert config.num_epochs == 1 and config.max_steps_per_epoch == 200


def test_parse_arg_types_and_rejects_unknown_words():
    args = common.parse_arg("quick,epochs=3,lr=0.5", quick=False, epochs=1, lr=0.1)
    assert (args.quick, args.epochs, args.lr) == (True, 3, 0.5)
    with pytest.raises(ValueError, match="unknown config argument 'quik' in 'quik'; valid: \\['quick'\\]"):
        common.parse_arg("quik", quick=False)
    with pytest.raises(ValueError, match="'epochs' needs a value"):
        common.parse_arg("epochs", epochs=1)


def test_model_config_rejects_unknown_model_keys():
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['widht'\\] for model 'bnn_mlp'"):
        common.model_config("bnn_mlp", widht=(3,))


def test_short_runs_read_per_step_progress():
    from configs import default, recipe

    # Per-epoch progress would hold a 1-epoch run's schedules at 0 and stop a 5-epoch
    # run's EDE at t = 4 of 10; from 10 epochs on, the official per-epoch stepping is kept.
    assert common.progress_unit(1) == common.progress_unit(9) == "step"
    assert common.progress_unit(10) == "epoch"
    assert default.get_config().progress_unit == "epoch"  # 15 epochs
    assert default.get_config("quick").progress_unit == "step"
    assert recipe.get_config("method=irnet").progress_unit == "step"  # 5 epochs
    assert recipe.get_config("method=irnet,epochs=20").progress_unit == "epoch"
    assert recipe.get_config("method=irnet,epochs=20,quick").progress_unit == "step"
