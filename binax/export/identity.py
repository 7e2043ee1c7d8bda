"""What a packed file records of its model, and the model rebuilt from that record.

:func:`module_identity` gives the record: the ``binax.models`` registry name and config
(every field for a class of your own, with its class name as text), quantizers by
``binax.binarizers`` registry name and their declared forwards. :func:`_build_module`
rebuilds a registry model from a record through the registries alone: nothing a file
names is imported or called.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from binax import binarizers, models
from binax.errors import ConfigError, PackedFileError
from binax.export import packed_file

__all__ = ["module_identity"]


def _jsonable(value, where: str):
    """Config values as JSON (dicts, lists, str, numbers, bools, None); callables refused."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigError(
        f"config value {where} = {value!r} cannot be stored in a packed model file; use registry "
        f"names (binax.binarizers.names()) and plain numbers, strings, lists and dicts."
    )


def _fields(model: nn.Module) -> dict[str, Any]:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}


def _registered_name(spec, key: str) -> str:
    """The registry name of a config's quantizer spec; a spec registered under no name (a
    plain callable, an unregistered descriptor) cannot be stored in a file."""
    q = binarizers.describe(spec)
    if q.name not in binarizers.names() or binarizers.describe(q.name) is not q:
        raise ConfigError(
            f"{key} {spec!r:.60} is not a registered quantizer; a packed model file names quantizers by registry "
            f"name only: register it (binax.binarizers.register(name, fn, bits=..., forward=...)) and use its name."
        )
    return q.name


def module_identity(model: nn.Module) -> tuple[str | None, str, dict, dict]:
    """``(registry name or None, class name, config, quantizers)`` that the file records.

    A registry model (:func:`binax.models.registry_name`: the name ``create`` gave it) is
    recorded by its name and the keys of its config (``binax.models.create(name,
    **config)`` gives the same module); any other module by its class name (text, never
    imported) and every field. Quantizers are stored by registry name
    (``"my_module:fn"`` becomes the name it is registered under), and ``quantizers``
    records each one's declared forward (:func:`binax.export.packed_file.quantizer_record`).
    """
    cls = type(model)
    fields = _fields(model)
    name = models.registry_name(model)
    config = dict(fields)
    if name is not None:
        config = {k: fields[k] for k in models.get_config(name).to_dict()}
        try:
            if _fields(models.create(name, **config)) != fields:
                name, config = None, dict(fields)  # a field outside the config was changed
        except (ConfigError, ValueError):
            name, config = None, dict(fields)
    quantizers = {}
    for key in packed_file.QUANTIZER_KEYS:
        if config.get(key) is not None:
            kwargs = dict(config.get(key + "_kwargs") or {})  # a mapping or (key, value) pairs
            quantizers[key] = packed_file.quantizer_record(config[key], kwargs)
            config[key] = _registered_name(config[key], key)
            if key + "_kwargs" in config:
                config[key + "_kwargs"] = kwargs
    return name, cls.__qualname__, _jsonable(config, "config"), _jsonable(quantizers, "quantizers")


def _build_module(meta: Mapping[str, Any], path="the packed model") -> nn.Module:
    """The registry module a file records (:func:`module_identity`), rebuilt from
    ``binax.models``' registry: nothing the file names is imported or called."""
    name = meta.get("model")
    if name is None:
        raise PackedFileError(
            f"{path}: its model is a class of your own ({meta.get('model_class')}), not in binax.models' registry, "
            f"and loading never imports code a file names: pass the module, load(path, model=...), or register "
            f"the class (binax.models.register) before export."
        )
    if name not in models.names():
        raise PackedFileError(
            f"{path}: model {name!r:.80} is not in binax.models' registry ({', '.join(models.names())}); import the "
            f"module that registers it before loading (the file never names code to import), or pass load(path, model=...)."
        )
    try:
        return models.create(name, **packed_file.loadable_config(meta, path))
    except PackedFileError:
        raise
    except ConfigError as e:
        raise PackedFileError(f"{path}: its config does not build {name!r}: {e}") from None
