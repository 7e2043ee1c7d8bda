"""The whole config is checked before a run writes anything: each bad value is named with
what is allowed, in one line, and the workdir is left as it was (not even created)."""

import os

import ml_collections
import pytest

from binax import train
from binax.errors import ConfigError
from binax.train import config_check
from configs import common, default, digits_mlp
from tests.test_train_faults import DIGITS, ROOT, cli


def _with(**flat):
    c = digits_mlp.get_config()
    for key, value in flat.items():
        c.update_from_flattened_dict({key: value})
    return c


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"model.widths": (-5, 3)}, "model.widths=(-5, 3) must hold integers >= 1"),
        ({"model.widths": (0,)}, "model.widths=(0,) must hold integers >= 1"),
        ({"grad_clip_norm": -1.0}, "grad_clip_norm=-1.0 must be a finite number in [0, inf)"),
        ({"label_smoothing": 2.0}, "label_smoothing=2.0 must be a finite number in [0, 1)"),
        ({"optimizer.learning_rate": -0.1}, "optimizer.learning_rate=-0.1 must be a finite number > 0"),
        ({"optimizer.learning_rate": 0.0}, "optimizer.learning_rate=0.0 must be a finite number > 0"),
        ({"optimizer.name": "adamm"}, "optimizer.name='adamm' must be one of 'sgd', 'nesterov', 'adam'"),
        ({"optimizer.schedule": "cosin"}, "optimizer.schedule='cosin' must be one of 'constant', 'cosine'"),
        ({"binary_optimizer.name": "bopp"}, "binary_optimizer.name='bopp' must be one of '', 'sgd'"),
        ({"max_steps_per_epoch": 0}, "max_steps_per_epoch=0 must be an integer >= 1"),
        ({"checkpoint.keep": 0}, "checkpoint.keep=0 must be an integer >= 1"),
        ({"num_epochs": 0}, "num_epochs=0 must be an integer >= 1"),
        ({"progress_unit": "epochs"}, "progress_unit='epochs' must be one of 'epoch', 'step'"),
        ({"model.width_multiplier": 0.0}, "model.width_multiplier=0.0 must be a finite number > 0"),
        ({"model.input_quantizer": "ede_signn"}, "Unknown binarizer 'ede_signn'; valid names are: "),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_each_bad_value_is_named_with_what_is_allowed(flat, message):
    with pytest.raises(ConfigError) as raised:
        config_check.validate(_with(**flat))
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_types_the_flag_parser_cannot_check_are_checked():
    # A config file that builds its ConfigDict from a dict: no field types to enforce.
    d = digits_mlp.get_config().to_dict()
    d["model"]["widths"] = 512  # not a network of one layer of 512
    d["checkpoint"]["async_save"] = "maybe"
    d["model"]["first_layer_float"] = 1
    found = config_check.problems(ml_collections.ConfigDict(d))
    assert "model.widths=512 must be a sequence such as (512, 512), not a single value" in found
    assert "checkpoint.async_save='maybe' must be True or False" in found
    assert "model.first_layer_float=1 must be True or False" in found


def test_quantizer_keywords_are_checked_against_the_function():
    with pytest.raises(ConfigError, match=r"\['width'\] for binarizer 'ede_sign'; allowed: \['t_max', 't_min'\] "
                                          r"\(model.input_quantizer='ede_sign', model.input_quantizer_kwargs=\{.*'width': 0.5"):
        c = digits_mlp.get_config()
        c.model.input_quantizer_kwargs.unlock()
        c.model.input_quantizer_kwargs.width = 0.5
        config_check.validate(c)


def test_every_shipped_config_is_valid():
    for module in (default, digits_mlp):
        for arg in (None, "quick"):
            assert config_check.problems(module.get_config(arg)) == []


def test_a_rejected_config_creates_nothing(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ConfigError, match="checkpoint.keep=0"):
        train.train_and_evaluate(_with(**{"checkpoint.keep": 0}), str(workdir))
    assert not workdir.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ConfigError, match="label_smoothing=2.0"):
        train.train_and_evaluate(_with(label_smoothing=2.0), str(existing))
    assert os.listdir(existing) == []  # not even the lock file


def test_a_multi_stage_recipe_is_checked_before_its_workdir_is_created(tmp_path):
    from binax import recipes
    from configs import recipe

    c = recipe.get_config("method=sb,quick")
    assert c.recipe.procedure == "self_binarizing"
    c.checkpoint.keep = 0
    with pytest.raises(ConfigError, match="checkpoint.keep=0 must be an integer >= 1"):
        recipes.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_a_config_word_that_is_not_a_boolean_is_rejected():
    assert common.parse_arg("quick=no", quick=True).quick is False
    with pytest.raises(ConfigError, match=r"quick='maybe' must be one of 1, true, yes, 0, false, no"):
        common.parse_arg("quick=maybe", quick=False)


@pytest.mark.slow  # four processes that each import jax
@pytest.mark.parametrize(
    "args, message",
    [
        ([f"--config={DIGITS}:quick=maybe"], "quick='maybe' must be one of"),
        ([f"--config={DIGITS}", "--config.model.widths=512"],
         "--config.model.widths=512: config.model.widths is a sequence (now (256, 256)); write one as '(512,)'"),
        ([f"--config={os.path.join(ROOT, 'configs', 'recipe.py')}:method=bnn",
          "--config.model.input_quantizer_kwargs.width=0.5"],
         "config.model.input_quantizer_kwargs has no keys in this config, so a flag cannot set 'width'"),
        ([f"--config={DIGITS}", "--config.optimizer.name=adamm", "--config.checkpoint.keep=0"],
         "optimizer.name='adamm' must be one of"),
    ],
    ids=["quick_maybe", "scalar_widths", "empty_kwargs", "optimizer_and_keep"],
)
def test_the_command_line_rejects_bad_values_in_one_line_creating_nothing(tmp_path, args, message):
    result = cli(*args, f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not (tmp_path / "w").exists()
