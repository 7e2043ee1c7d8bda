"""Every recipe of configs/recipe.py trains end to end (a few steps), including the
multi-stage ones: Self-Binarizing's sign + BinaryBN evaluation and BinaryDuo's
couple -> decouple -> fine-tune (whose decoupling check raises if the logits differ)."""

import json
import os
import subprocess
import sys

import pytest

from binax import recipes, train
from binax.errors import ConfigError
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
    if config.data.validation_holdout:  # the split's path at a tenth of its evaluation cost
        config.data.validation_holdout = 1000
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
        # The recipe holds out a validation split: the deployed and trained networks' figures on it.
        assert 0.0 <= summary["validation_accuracy"] <= 1.0 and 0.0 <= summary["tanh_validation_accuracy"] <= 1.0
    if spec in ("method=irnet", "method=sb"):
        # A 3-step run still moves its schedule (per-step progress in short runs).
        records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        assert max(r.get("progress", 0.0) for r in records) > 0.5
    if "method=binaryduo" in spec:
        assert summary["decoupling_prediction_agreement"] == 1.0
        assert summary["decoupling_max_logit_diff"] < 1e-4
        # Tied decoupling: the layers keep the coupled widths (their outputs are copied).
        assert summary["decoupled_widths"] == [90, 75, 128]  # (362, 300, 512) / 4, quick
        assert os.path.exists(tmp_path / "decoupled" / "final.json")
        # Validation figures of every stage; decoupling is exact on the validation split too.
        assert summary["decoupled_validation_accuracy"] == summary["coupled_validation_accuracy"]
        assert 0.0 <= summary["validation_accuracy"] <= 1.0


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


def test_binaryduo_finetunes_at_a_factor_of_the_coupled_learning_rate():
    # The recipe's factor per architecture, as validation chose it (docs/recipes.md).
    for spec, arch in (("arch=mlp", "mlp"), ("arch=cnn", "conv"), ("dataset=cifar10", "conv")):
        config = recipe.get_config(f"method=binaryduo,{spec}")
        ft = recipes.finetune_config(config, {})
        factor = recipe.BINARYDUO_FINETUNE_LR_FACTOR[arch]
        assert ft.optimizer.learning_rate == pytest.approx(config.optimizer.learning_rate * factor), spec
    config = recipe.get_config("method=binaryduo")
    lr = config.optimizer.learning_rate
    ft = recipes.finetune_config(config, {"widths": [8, 8, 8]})
    assert ft.optimizer.learning_rate == pytest.approx(lr * recipe.BINARYDUO_FINETUNE_LR_FACTOR["mlp"])
    assert (ft.num_epochs, ft.recipe.procedure, ft.model.widths) == (config.recipe.finetune_epochs, "train", (8, 8, 8))
    assert config.model.widths == (362, 300, 512) and config.recipe.procedure == "binaryduo"  # a copy
    assert recipes.finetune_config(config, {}, 0.01).optimizer.learning_rate == pytest.approx(lr * 0.01)
    del config.recipe["finetune_lr_factor"]  # a config of its own: the library's default
    assert recipes.finetune_config(config, {}).optimizer.learning_rate == pytest.approx(lr * recipes.FINETUNE_LR_FACTOR)


def test_binaryduo_widths_follow_the_official_rule_and_match_the_binary_cost():
    import binax

    # The official tiny VGG-7 (tinyVGG7.lua 64-64-128-128-512-512 -> tinyVGG7_coupled.lua).
    assert recipes.binaryduo_widths("vgg7_tiny", (32, 32, 3), widths=(64, 64, 128, 128), hidden_dense=(512, 512)) == {
        "widths": (45, 45, 90, 90), "hidden_dense": (336, 512)}
    for arch in ("mlp", "cnn"):
        config = recipe.get_config(f"method=binaryduo,arch={arch}")
        plain = recipe.get_config(f"method=duo_binary,arch={arch}")
        coupled = binax.summary(train.create_model(config.model), (28, 28, 1)).binary_ops
        base = binax.summary(train.create_model(plain.model), (28, 28, 1)).binary_ops
        # Ternary counts as two binary activations: same binary-op count within rounding.
        assert coupled == pytest.approx(base, rel=0.02), arch
    assert recipe.get_config("method=binaryduo").model.widths == (362, 300, 512)
    with pytest.raises(ConfigError, match="width_multiplier=1 and replicate=1; got width_multiplier=0.5"):
        recipes.binaryduo_widths("bnn_mlp", (28, 28, 1), widths=(8, 8), width_multiplier=0.5)


def test_decoupling_check_allows_a_threshold_rounding_flip_not_a_wrong_transform():
    import numpy as np

    rng = np.random.default_rng(0)
    coupled = rng.normal(size=(10000, 10)).astype(np.float32) * 5
    decoupled = coupled + 1e-6
    decoupled[4641] += 0.2  # one image: an activation flipped at y = 0.25 - 1 ulp (seen on the CNN)
    max_diff, differing, agreement = recipes.check_decoupling(coupled, decoupled)
    assert differing == 1e-4 and max_diff == pytest.approx(0.2, rel=1e-3) and agreement >= 0.9999
    wrong = coupled + rng.normal(size=coupled.shape).astype(np.float32) * 0.1
    with pytest.raises(AssertionError, match="differs from the coupled one on"):
        recipes.check_decoupling(coupled, wrong)
