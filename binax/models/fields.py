"""A model family's config is its module's dataclass fields, declared once.

Each field of a :class:`~binax.models.common.BinaryModel` subclass is a config key; its
default is the key's default and its annotation says what values are allowed::

    widths: Widths = (2048, 2048, 2048)      # a sequence of integers >= 1
    layer_type: Literal["binary", "abc"] = "binary"
    latent_weight_clip: Positive | None = None
    input_quantizer: QuantizerSpec = "ste_sign"   # checked with input_quantizer_kwargs

From the fields come the default ``ConfigDict`` of a registered name (:func:`config`, which
``--config.model.x=...`` flags override: a ``None`` default becomes a placeholder of the
annotated type), and the checks both ``binax.models.create`` and the training config's
validation run (:func:`problems`). Checks that relate several fields (``pool_after``
within ``widths``) stay in the family's ``validate_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Annotated, Any, Callable, Literal, Mapping

import ml_collections
from ml_collections import config_dict

from binax import quantizer

__all__ = [
    "Check",
    "Count",
    "Positive",
    "Fraction",
    "Real",
    "Widths",
    "QuantizerSpec",
    "Keywords",
    "names",
    "defaults",
    "config",
    "problems",
]


@dataclasses.dataclass(frozen=True)
class Check:
    """``test(value)``: None when the value is allowed, else what the value must do, as the
    words after "must" (``'be an integer >= 1'``)."""

    test: Callable[[Any], str | None]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _ints_at_least_one(v) -> str | None:
    if not isinstance(v, (tuple, list)):
        return "be a sequence such as (512, 512), not a single value"
    return None if all(_is_int(x) and x >= 1 for x in v) else "hold integers >= 1"


Count = Annotated[int, Check(lambda v: None if _is_int(v) and v >= 1 else "be an integer >= 1")]
Positive = Annotated[float, Check(lambda v: None if _is_real(v) and v > 0 else "be a finite number > 0")]
Fraction = Annotated[float, Check(lambda v: None if _is_real(v) and 0 <= v <= 1 else "be a finite number in [0, 1]")]
Real = Annotated[float, Check(lambda v: None if _is_real(v) else "be a finite number")]
Widths = Annotated[tuple[int, ...], Check(_ints_at_least_one)]
#: A binarizer: a registry name, ``"module:attribute"``, a function or a Quantizer; checked
#: together with the ``<field>_kwargs`` field beside it. ``''`` (what a flag can write) is None.
QuantizerSpec = Annotated[Any, "quantizer"]
Keywords = Annotated[Mapping[str, Any], Check(lambda v: None if isinstance(v, Mapping) else "be a mapping of keywords")]


def names(cls: type) -> tuple[str, ...]:
    """The config keys of a model class: its dataclass fields but Flax's ``parent``/``name``."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Each field's resolved annotation. A class whose own annotations do not resolve (a
    name imported only for type checkers) keeps those of the nearest base that do: its
    own fields are then unchecked (``Any``)."""
    hints: dict[str, Any] = {}
    for klass in cls.__mro__:
        try:
            hints = typing.get_type_hints(klass, include_extras=True)
            break
        except NameError:
            continue
    return {k: hints.get(k, Any) for k in names(cls)}


def _unwrap(hint) -> tuple[Any, list, bool]:
    """``(bare type, checks, optional)`` of an annotation."""
    optional, checks = False, []
    while True:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(hint))
            hint = args[0] if len(args) == 1 else Any
        elif origin is Annotated:
            checks += list(hint.__metadata__)
            hint = typing.get_args(hint)[0]
        else:
            return hint, checks, optional


def _type_check(hint) -> Callable[[Any], str | None] | None:
    origin = typing.get_origin(hint) or hint
    if origin is Literal:
        allowed = typing.get_args(hint)
        return lambda v: None if v in allowed else f"be one of {', '.join(repr(a) for a in allowed)}"
    if origin is bool:
        return lambda v: None if isinstance(v, bool) else "be True or False"
    if origin is int:
        return lambda v: None if _is_int(v) else "be an integer"
    if origin is float:
        return lambda v: None if _is_real(v) else "be a finite number"
    if origin is str:
        return lambda v: None if isinstance(v, str) else "be a string"
    if origin is tuple:
        return lambda v: None if isinstance(v, (tuple, list)) else "be a sequence"
    return None


def defaults(cls: type) -> dict[str, Any]:
    """Every config key of ``cls`` with its field default."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name in names(cls)}


def _config_value(hint, value):
    if value is None:
        # A None default stays settable from a flag: a placeholder of the field's type.
        bare = _unwrap(hint)[0]
        return config_dict.placeholder(bare if bare in (int, float, str) else float)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def config(cls: type, preset: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The default config of ``cls`` with a registered name's ``preset`` values over it."""
    values = defaults(cls) | dict(preset or {})
    hints = _hints(cls)
    return ml_collections.ConfigDict({k: _config_value(hints[k], v) for k, v in values.items()})


def _field_problem(hint, value) -> str | None:
    bare, checks, optional = _unwrap(hint)
    if value is None:
        return None if optional else "not be None"
    found = [c.test for c in checks if isinstance(c, Check)]
    if not found:
        found = [c for c in [_type_check(bare)] if c is not None]
    for test in found:
        allowed = test(value)
        if allowed:
            return f"be None or {allowed.removeprefix('be ')}" if optional else allowed
    return None


def _quantizer_problem(values: Mapping[str, Any], key: str, prefix: str) -> str | None:
    spec = values[key]
    kwargs = values.get(key + "_kwargs") or {}
    kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs)
    try:
        quantizer.resolve(None if spec == "" else spec, **kwargs)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        # The registry's message first: it names the value and lists what is allowed.
        return f"{str(e).rstrip('.')} ({prefix}{key}={spec!r}, {prefix}{key}_kwargs={kwargs!r})"
    return None


def problems(cls: type, values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One sentence per key of ``values`` that its field of ``cls`` does not allow
    (``'<prefix>widths=(0,) must hold integers >= 1'``); keys that are not
    fields are left to the caller."""
    out = []
    for key, hint in _hints(cls).items():
        if key not in values:
            continue
        if "quantizer" in _unwrap(hint)[1]:
            bad = _quantizer_problem(values, key, prefix)
            if bad:
                out.append(bad)
            continue
        allowed = _field_problem(hint, values[key])
        if allowed:
            out.append(f"{prefix}{key}={values[key]!r} must {allowed}")
    return out
