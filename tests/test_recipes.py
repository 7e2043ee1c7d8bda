"""Every recipe of configs/recipe.py trains end to end (a few steps), including the
multi-stage ones: Self-Binarizing's sign + BinaryBN evaluation and BinaryDuo's
couple -> decouple -> fine-tune (whose decoupling check raises if the logits differ)."""

import json
import os
import subprocess
import sys

import pytest

from binax import recipes
from configs import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = [
    "method=fp",
    "method=bnn",
    "method=xnor",
    "method=dorefa",
    "method=bireal",
    "method=reactnet",
    "method=irnet",
    "method=abc,m=1,n=1",
    "method=abc,m=3,n=3",
    "method=abc,m=5,n=5",
    "method=sb",
    "method=binaryduo",
    "method=duo_binary",
    "method=xnor,arch=cnn",
]


def _tiny(spec):
    config = recipe.get_config(spec + ",quick")
    config.max_steps_per_epoch = 3
    config.eval_batch_size = 2000
    config.report_every_seconds = 1000.0
    return config


def test_every_method_has_a_spec_here():
    assert {s.split(",")[0][len("method="):] for s in SPECS} == set(recipe.METHODS)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS)
def test_recipe_trains(spec, tmp_path):
    summary = recipes.run(_tiny(spec), str(tmp_path))
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    if "method=sb" in spec:
        assert set(summary) >= {"agreement", "tanh_test_accuracy"}
        assert json.load(open(tmp_path / "recipe.json"))["agreement"] == summary["agreement"]
        # The recipe's nu_max makes the deployed sign + BinaryBN network the trained one.
        assert summary["agreement"] == 1.0
    if "method=binaryduo" in spec:
        assert summary["decoupling_prediction_agreement"] == 1.0
        assert summary["decoupling_max_logit_diff"] < 1e-4
        # The decoupled network doubled the coupled layers: (64, 64, 128) -> 128 each.
        assert summary["decoupled_widths"] == [128, 128, 128]
        assert os.path.exists(tmp_path / "decoupled" / "final.json")


def test_recipe_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown method 'irnett'; valid: fp, bnn"):
        recipe.get_config("method=irnett")
    with pytest.raises(ValueError, match="unknown dataset"):
        recipe.get_config("dataset=svhn")
    # The papers' settings for users with the data.
    c = recipe.get_config("method=irnet,dataset=cifar10,arch=resnet")
    assert (c.model.name, c.num_epochs, c.optimizer.learning_rate) == ("resnet20", 400, 0.1)
    assert c.model.input_quantizer_kwargs.t_min == 1e-3
    c = recipe.get_config("method=irnet,dataset=cifar10")
    assert (c.model.name, c.num_epochs, c.optimizer.learning_rate) == ("vgg_small", 300, 0.007)
    assert recipe.get_config("method=bireal,dataset=imagenet2012").model.name == "resnet18"


@pytest.mark.slow
def test_binaryduo_is_one_command(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config", "configs/recipe.py:method=binaryduo,quick",
         "--config.max_steps_per_epoch=2", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "binaryduo: coupled (ternary)" in out.stdout
    assert json.load(open(tmp_path / "recipe.json"))["decoupling_prediction_agreement"] == 1.0
