"""The model registry: ``create(name, **overrides)``, ``names()``, ``get_config(name)``.

Each registered model is a Flax Linen module whose fields are exactly the keys of its
default ``ml_collections.ConfigDict``; ``create`` applies overrides to that config (an
unknown key raises a ``ValueError`` listing the valid keys), validates binarizer names and
keywords, and returns the module. Call it as
``model.apply(variables, x, train=bool, progress=p, mutable=['batch_stats'] if train else False)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import ml_collections

from binax import binarizers
from binax.errors import ConfigError
from binax.models import alexnet, common, mlp, resnet, vgg
from binax.models.tracing import Call, record_calls, trace

__all__ = [
    "create",
    "names",
    "get_config",
    "register",
    "registry_name",
    "inference_overrides",
    "common",
    "Call",
    "record_calls",
    "trace",
]

_REGISTRY: dict[str, tuple[Callable[[], ml_collections.ConfigDict], type[nn.Module]]] = {}


def register(name: str, config_fn: Callable[[], ml_collections.ConfigDict], model_cls: type[nn.Module]) -> None:
    """Register ``model_cls`` under ``name`` with default config ``config_fn()``; ``name``
    becomes the Flax name of the modules :func:`create` builds (an identifier)."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"a model name must be an identifier (letters, digits, '_'); got {name!r}.")
    if name in _REGISTRY:
        raise ConfigError(f"A model named {name!r} is already registered.")
    fields = {f.name for f in dataclasses.fields(model_cls)} - {"parent", "name"}
    unknown = set(config_fn().keys()) - fields
    if unknown:
        raise ConfigError(f"config keys {sorted(unknown)} of model {name!r} are not fields of {model_cls.__name__}.")
    _REGISTRY[name] = (config_fn, model_cls)


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str):
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown model {name!r}; valid names are: {', '.join(names())}.") from None


def get_config(name: str) -> ml_collections.ConfigDict:
    """The default config of model ``name`` (a fresh, locked ``ConfigDict``)."""
    cfg = _entry(name)[0]()
    cfg.lock()
    return cfg


def create(name: str, **overrides: Any) -> nn.Module:
    """Build model ``name`` from its default config with ``overrides`` applied.

    ``overrides`` may also be a whole config: ``create(name, **config)`` with a dict or
    ``ConfigDict`` whose keys are a subset of ``get_config(name)``. Binarizers may be given
    as registry names or callables. Overriding a binarizer without its ``*_kwargs`` drops
    the default binarizer's keywords (they would not fit the new one).
    """
    config_fn, model_cls = _entry(name)
    values = config_fn().to_dict()
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {unknown} for model {name!r}; valid keys: {', '.join(sorted(values))}."
        )
    # Keyword arguments belong to their binarizer: a new binarizer without new keywords
    # starts from none, not from the default binarizer's (e.g. EDE's t_min).
    for key in ("input_quantizer", "kernel_quantizer"):
        if key in overrides and key + "_kwargs" not in overrides and overrides[key] != values[key]:
            values[key + "_kwargs"] = {}
    values.update(overrides)
    values = {k: common.freeze(v) for k, v in values.items()}
    common.validate_common(values, name)
    if hasattr(model_cls, "validate_config"):
        model_cls.validate_config(values)
    # The registry name is the module's (Flax) name, which clone() keeps: registry_name()
    # reads it back (a top-level module's name prefixes no variable).
    return model_cls(**values, name=name)


def registry_name(model: nn.Module) -> str | None:
    """The registry name :func:`create` built ``model`` under (kept by ``model.clone``), or
    None for a module built otherwise (a class of your own, or one built by its class)."""
    name = getattr(model, "name", None)
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    return name if entry is not None and type(model) is entry[1] else None


def inference_overrides(config: Any) -> dict[str, Any]:
    """The quantizer keys of a model config (or model) that change at inference.

    Each of ``input_quantizer``/``kernel_quantizer`` is replaced by its deployed form
    (:func:`binax.binarizers.deployed`, e.g. Self-Binarizing's ``tanh_sign`` by ``sign``),
    with its ``*_kwargs``; ``{}`` when nothing changes. ``config`` is a mapping or a model
    (its fields).
    """
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    out: dict[str, Any] = {}
    for key in ("input_quantizer", "kernel_quantizer"):
        spec = get(key)
        new, kwargs = binarizers.deployed(spec, get(key + "_kwargs"))
        if new != spec:
            out[key], out[key + "_kwargs"] = new, kwargs
    return out


register("bnn_mlp", mlp.get_config, mlp.MLP)
register("cnn_small", vgg.cnn_small_config, vgg.VGG)
register("vgg_small", vgg.vgg_small_config, vgg.VGG)
register("vgg7_tiny", vgg.vgg7_tiny_config, vgg.VGG)
register("resnet20", resnet.resnet20_config, resnet.ResNet)
register("resnet18_cifar", resnet.resnet18_cifar_config, resnet.ResNet)
register("resnet18", resnet.resnet18_config, resnet.ResNet)
register("resnet34", resnet.resnet34_config, resnet.ResNet)
register("reactnet18", resnet.reactnet18_config, resnet.ResNet)
register("alexnet", alexnet.alexnet_config, alexnet.AlexNet)
