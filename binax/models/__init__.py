"""The model registry: ``create(name, **overrides)``, ``names()``, ``get_config(name)``.

Each registered name is a Flax Linen module class and a preset: the values by which the
name differs from the class's field defaults (each family's ``PRESETS``). The fields are
the config, declared once (:mod:`binax.models.fields`): ``get_config`` is every field with
the preset over its default; ``create`` applies overrides to it (an unknown key raises a
``ValueError`` listing the valid keys), checks each value against its field's annotation
and binarizer names and keywords, and returns the module. Call it as
``model.apply(variables, x, train=bool, progress=p, mutable=['batch_stats'] if train else False)``.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

import flax.linen as nn
import ml_collections

from binax import binarizers
from binax.errors import ConfigError
from binax.models import alexnet, common, fields, mlp, resnet, vgg
from binax.models.tracing import Call, record_calls, trace

__all__ = [
    "create",
    "names",
    "get_config",
    "problems",
    "register",
    "registry_name",
    "inference_overrides",
    "common",
    "fields",
    "Call",
    "record_calls",
    "trace",
]

QUANTIZER_KEYS = ("input_quantizer", "kernel_quantizer")

_REGISTRY: dict[str, tuple[type[nn.Module], Mapping[str, Any]]] = {}


def register(name: str, model_cls: type[nn.Module], **preset: Any) -> None:
    """Register ``model_cls`` under ``name``; its config is the class's fields with
    ``preset`` values over their defaults (every key must be a field). ``name`` becomes
    the Flax name of the modules :func:`create` builds (an identifier)."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ConfigError(f"a model name must be an identifier (letters, digits, '_'); got {name!r}.")
    if name in _REGISTRY:
        raise ConfigError(f"A model named {name!r} is already registered.")
    unknown = set(preset) - set(fields.names(model_cls))
    if unknown:
        raise ConfigError(f"preset keys {sorted(unknown)} of model {name!r} are not fields of {model_cls.__name__}.")
    _REGISTRY[name] = (model_cls, types.MappingProxyType(dict(preset)))


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str):
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"Unknown model {name!r}; valid names are: {', '.join(names())}.") from None


def get_config(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The default config of model ``name`` (a fresh, locked ``ConfigDict``): every field
    of its class with the registered preset over the field defaults, and ``overrides``
    (field names) over both. A ``None`` value is a placeholder of the field's type, so a
    flag can set it."""
    model_cls, preset = _entry(name)
    unknown = sorted(set(overrides) - set(fields.names(model_cls)))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for model {name!r}; valid: {sorted(fields.names(model_cls))}")
    cfg = fields.config(model_cls, dict(preset) | overrides)
    cfg.lock()
    return cfg


def problems(name: str, values: Any, prefix: str = "") -> list[str]:
    """One sentence per problem of ``values`` (a mapping of config keys) as a config of
    model ``name``: a key that is not a field, a value its field does not allow
    (:func:`binax.models.fields.problems`), then the family's ``validate_config``."""
    model_cls, preset = _entry(name)
    valid = fields.names(model_cls)
    out = [
        f"{prefix}{key} is not a key of model {name!r}; valid: {', '.join(sorted(valid))}"
        for key in sorted(set(values) - set(valid))
    ]
    out += fields.problems(model_cls, values, prefix)
    if not out and hasattr(model_cls, "validate_config"):
        full = fields.config(model_cls, preset).to_dict() | dict(values)
        try:
            model_cls.validate_config({k: common.freeze(v) for k, v in full.items()})
        except ConfigError as e:
            out.append(f"{prefix.rstrip('.') or 'model'}: {str(e).rstrip('.')}")
    return out


def create(name: str, **overrides: Any) -> nn.Module:
    """Build model ``name`` from its default config with ``overrides`` applied.

    ``overrides`` may also be a whole config: ``create(name, **config)`` with a dict or
    ``ConfigDict`` whose keys are a subset of ``get_config(name)``. Binarizers may be given
    as registry names or callables (``''``, what a flag can write, is None). Overriding a
    binarizer without its ``*_kwargs`` drops the default binarizer's keywords (they would
    not fit the new one). Each value is checked against its field's declaration
    (:func:`binax.models.fields.problems`), then the family's ``validate_config``.
    """
    model_cls, preset = _entry(name)
    values = fields.config(model_cls, preset).to_dict()
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {unknown} for model {name!r}; valid keys: {', '.join(sorted(values))}."
        )
    # Keyword arguments belong to their binarizer: a new binarizer without new keywords
    # starts from none, not from the default binarizer's (e.g. EDE's t_min).
    for key in QUANTIZER_KEYS:
        if key in overrides and key + "_kwargs" not in overrides and overrides[key] != values[key]:
            values[key + "_kwargs"] = {}
    values.update(overrides)
    values = {k: common.freeze(v) for k, v in values.items()}
    for key in QUANTIZER_KEYS:
        if values[key] == "":
            values[key] = None
    bad = fields.problems(model_cls, values)
    if bad:
        raise ConfigError(f"Model {name!r}: {'; '.join(bad)}.")
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
    return name if entry is not None and type(model) is entry[0] else None


def inference_overrides(config: Any) -> dict[str, Any]:
    """The quantizer keys of a model config (or model) that change at inference.

    Each of ``input_quantizer``/``kernel_quantizer`` is replaced by its deployed form
    (:func:`binax.binarizers.deployed`, e.g. Self-Binarizing's ``tanh_sign`` by ``sign``),
    with its ``*_kwargs``; ``{}`` when nothing changes. ``config`` is a mapping or a model
    (its fields).
    """
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    out: dict[str, Any] = {}
    for key in QUANTIZER_KEYS:
        spec = get(key)
        new, kwargs = binarizers.deployed(spec, get(key + "_kwargs"))
        if new != spec:
            out[key], out[key + "_kwargs"] = new, kwargs
    return out


for _cls, _presets in ((mlp.MLP, mlp.PRESETS), (vgg.VGG, vgg.PRESETS), (resnet.ResNet, resnet.PRESETS),
                       (alexnet.AlexNet, alexnet.PRESETS)):
    for _name, _preset in _presets.items():
        register(_name, _cls, **_preset)
