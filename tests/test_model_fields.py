"""A model family's config is its module's dataclass fields: the defaults, the checks of
``models.create`` and of the training config, and the ``--config.model.x`` flags all come
from one declaration (binax.models.fields)."""

import dataclasses
from typing import Literal

import flax.linen as nn
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from binax import config as binax_config
from binax import models
from binax.errors import ConfigError
from binax.models import common, fields
from binax.train import config_check, loop


def _flags(cfg, *args):
    """``cfg`` after the command line ``args`` (``--config.key=value``)."""
    values, argv = flags.FlagValues(), ["prog", *args]
    config_flags.DEFINE_config_dict("config", cfg, flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("name", models.names())
def test_a_registered_config_is_its_class_fields_with_the_preset_over_them(name):
    model = models.create(name)
    cfg = models.get_config(name)
    assert sorted(cfg) == sorted(fields.names(type(model)))
    preset = models._REGISTRY[name][1]
    for f in dataclasses.fields(type(model)):
        if f.name in cfg:
            expected = preset.get(f.name, f.default)
            assert common.freeze(cfg.to_dict()[f.name]) == common.freeze(expected), f.name
            assert getattr(model, f.name) == common.freeze(expected), f.name
    # The config the trainer builds (binax.config.model_config, as configs/ do) gives the
    # same module as the registry, and so does the whole config passed back.
    assert loop.create_model(binax_config.model_config(name)) == model
    assert models.create(name, **cfg) == model
    assert config_check.problems(ml_collections.ConfigDict({"model": binax_config.model_config(name)})) == []
    # The layer factories see the model's own quantization fields.
    spec = common.layer_spec(model)
    assert all(getattr(spec, k) == getattr(model, k) for k in common.SPEC_FIELDS)


class _Toy(common.BinaryModel):
    """A family declared only by its fields: nothing else names depth or mode."""

    depth: fields.Count = 2
    mode: Literal["plain", "fancy"] = "plain"
    scale: fields.Positive | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, progress=1.0):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@pytest.fixture
def toy():
    models.register("_toy_fields", _Toy, depth=3)
    yield "_toy_fields"
    del models._REGISTRY["_toy_fields"]


def test_a_new_field_gets_its_default_checks_and_flag_from_its_declaration(toy):
    cfg = models.get_config(toy)
    assert (cfg.depth, cfg.mode, cfg.scale, cfg.num_classes) == (3, "plain", None, 10)
    assert models.create(toy, mode="fancy").mode == "fancy"
    # '' is what a flag can write for "no binarizer".
    assert models.create(toy, input_quantizer="").input_quantizer is None
    with pytest.raises(ConfigError, match=r"Model '_toy_fields': mode='odd' must be one of 'plain', 'fancy'\.$"):
        models.create(toy, mode="odd")
    with pytest.raises(ConfigError, match=r"depth=0 must be an integer >= 1; scale=-1.0 must be None or a finite"):
        models.create(toy, depth=0, scale=-1.0)
    c = binax_config.base_config()
    c.model = binax_config.model_config(toy)
    c.model.depth = True  # a bool is not a count
    assert "model.depth=True must be an integer >= 1" in config_check.problems(c)
    # A None default is a placeholder of the field's type: a flag can set it.
    flagged = _flags(binax_config.model_config(toy), "--config.scale=0.5", "--config.mode=fancy", "--config.depth=4")
    assert (flagged.scale, flagged.mode, flagged.depth) == (0.5, "fancy", 4)


def test_a_preset_key_that_is_not_a_field_is_refused():
    with pytest.raises(ConfigError, match=r"preset keys \['dpeth'\] of model '_bad_toy' are not fields of _Toy"):
        models.register("_bad_toy", _Toy, dpeth=3)
    assert "_bad_toy" not in models.names()


def test_a_config_typo_or_a_cross_field_mistake_is_named_before_the_run():
    c = binax_config.base_config()
    c.model = binax_config.model_config("cnn_small")
    with c.model.ignore_type(), c.model.unlocked():
        c.model.widht = (3,)  # a config file that builds its model block by hand
    found = config_check.problems(c)
    assert len(found) == 1 and found[0].startswith("model.widht is not a key of model 'cnn_small'; valid: abc_m")
    del c.model["widht"]
    c.model.pool_after = (2, 5)
    found = config_check.problems(c)
    assert len(found) == 1 and "model: pool_after (2, 5) names convolutions [5] that do not exist" in found[0]


def test_flags_reach_every_key_with_the_declared_type():
    cfg = binax_config.model_config("resnet20")
    flagged = _flags(cfg, "--config.latent_weight_clip=1.5", "--config.stage_sizes=(1, 1, 1)", "--config.shortcut=B")
    model = loop.create_model(flagged)
    assert (model.latent_weight_clip, model.stage_sizes, model.shortcut) == (1.5, (1, 1, 1), "B")
    with pytest.raises(flags.Error, match="pad_values"):
        _flags(cfg, "--config.pad_values=one")  # a float placeholder takes numbers only


def test_a_field_whose_annotation_does_not_resolve_is_left_unchecked():
    # As a user's module with `from __future__ import annotations` and a name imported only
    # under TYPE_CHECKING: the inherited fields keep their checks.
    namespace = {"__annotations__": {"extra": "NotImportedHere"}, "extra": 1, "__module__": __name__}
    cls = type("_Unresolved", (_Toy,), namespace)
    assert fields.problems(cls, {"extra": "anything", "depth": 0}) == ["depth=0 must be an integer >= 1"]
