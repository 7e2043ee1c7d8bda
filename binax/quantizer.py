"""The quantizer descriptor and registry: what a quantizer IS, written once.

Every part of binax that needs a fact about a quantizer reads its :class:`Quantizer`
descriptor, never a list of names: the summary (``bits``, ``binary_planes``), the
training fast path (``forward``), export (``forward``, ``levels``, ``inference``), the
gradient-mismatch study (``forward``, ``inference``), model surgery (``inference``,
``scale_equivariant``) and the layers (``schedule``, through :func:`resolve`). As Larq's
quantizers carry their ``precision`` and qwix's configs their bit widths, a quantizer
registered in a user's own module is then counted, trained, exported and measured like a
built-in one.

A spec (a layer's ``input_quantizer``/``kernel_quantizer``) is one of:

* a registered name (``"ede_sign"``; :func:`names`), the built-ins registered by
  :mod:`binax.binarizers`;
* ``"package.module:attribute"``: the module is imported and the attribute used, so a
  config string can name a quantizer defined anywhere (:func:`import_plugins` imports
  modules that register under plain names);
* a :class:`Quantizer`, or a registered function itself;
* any other callable ``fn(x, **kwargs)`` (an undeclared quantizer: computed in float,
  counted at ``fn.bits`` bits, default 1);
* ``None``: no quantization.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import jax

from binax.errors import ConfigError

Array = jax.Array

__all__ = [
    "FORWARDS",
    "Quantizer",
    "register",
    "describe",
    "schedule_values",
    "get",
    "names",
    "resolve",
    "deployed",
    "import_plugins",
    "check_file_spec",
]

#: What a quantizer's forward pass can be declared to produce (:attr:`Quantizer.forward`).
FORWARDS = ("sign", "scaled_sign", "levels", "other")


def _call_with(fn: Callable, kwargs: Mapping[str, Any]):
    """``fn(**kwargs)`` with only the keywords ``fn`` takes (its defaults for the rest)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Quantizer:
    """What a quantizer is: its function and the facts every consumer reads.

    Attributes:
      name: the registry name (for an undeclared callable, its ``__name__``).
      fn: the function, ``fn(x, **kwargs)``, usually a ``jax.custom_vjp`` estimator.
      bits: bits per value at inference (memory in ``binax.summary``): an int, or a
        function of the quantizer's keyword arguments (DoReFa: ``lambda k_bit=2: k_bit``).
      forward: the values the forward pass gives while training:

        * ``"sign"``: exactly ``±1``, ``sign(0) = +1``. A layer with a ``"sign"`` input
          and a ``"sign"``/``"scaled_sign"`` kernel trains on the XNOR-popcount fast path
          (:mod:`binax.ops`) and exports packed; gradient mismatch measures it against
          the sign network.
        * ``"scaled_sign"``: ``±α`` with one ``α >= 0`` per output channel (the last
          axis); for kernels (XNOR-Net, Libra-PB, BinaryDuo).
        * ``"levels"``: the ``P + 1`` levels ``low + j·step`` given by ``levels``; an
          input exports as ``P`` packed bit planes.
        * ``"other"``: anything else (computed in float).
      levels: ``(low, step, P)`` for ``forward="levels"``, or a function of the keyword
        arguments returning it (DoReFa's ``k_bit``).
      binary_planes: for a quantizer of more than one bit whose values the summary counts
        as a sum of binary planes: how many (BinaryDuo's ternary activation decouples
        into 2 binary activations; ABC-Net's M weight bases), an int or a function of the
        keyword arguments. A 1-bit quantizer is always 1 plane; ``None``: a MAC with this
        operand is a float MAC.
      schedule: ``schedule(progress, **schedule_kwargs) -> {arg: value}``, the arguments
        of ``fn`` that follow training progress (EDE's ``t``/``k``, tanh's ``nu``).
      schedule_outputs: the arguments ``schedule`` supplies (not settable by users).
      inference: the registered name this quantizer is replaced by at inference, without
        keyword arguments (Self-Binarizing ``tanh_sign`` is deployed as ``"sign"``);
        ``None``: itself.
      scale_equivariant: ``q(c·w) = c·q(w)`` for ``c > 0`` (mean|w|-scaled kernels),
        which BinaryDuo's decoupling needs of the consumer's weight binarizer.
    """

    name: str
    fn: Callable[..., Array]
    bits: int | Callable[..., int]
    forward: str = "other"
    levels: tuple[float, float, int] | Callable[..., tuple[float, float, int]] | None = None
    binary_planes: int | Callable[..., int | None] | None = None
    schedule: Callable[..., Mapping[str, Array]] | None = None
    schedule_outputs: tuple[str, ...] = ()
    inference: str | None = None
    scale_equivariant: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or ":" in self.name:
            raise ConfigError(f"a quantizer name must be a non-empty string without ':'; got {self.name!r}.")
        if not callable(self.fn):
            raise ConfigError(f"quantizer {self.name!r}: fn must be callable; got {self.fn!r}.")
        if not callable(self.bits) and (isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits < 1):
            raise ConfigError(
                f"quantizer {self.name!r}: bits must be an int >= 1 (bits per value at inference) or a "
                f"function of the keyword arguments; got {self.bits!r}."
            )
        if self.forward not in FORWARDS:
            raise ConfigError(f"quantizer {self.name!r}: forward={self.forward!r} is not one of {FORWARDS}.")
        if (self.forward == "levels") != (self.levels is not None):
            raise ConfigError(
                f"quantizer {self.name!r}: levels=(low, step, P) goes with forward='levels' and only with it; "
                f"got forward={self.forward!r}, levels={self.levels!r}."
            )
        if self.schedule_outputs and self.schedule is None:
            raise ConfigError(f"quantizer {self.name!r}: schedule_outputs {self.schedule_outputs} without a schedule.")
        object.__setattr__(self, "schedule_outputs", tuple(self.schedule_outputs))

    # ---- facts that depend on the keyword arguments

    def bits_for(self, kwargs: Mapping[str, Any] | None = None) -> int:
        """Bits per value at inference for these keyword arguments."""
        return int(_call_with(self.bits, dict(kwargs or {})) if callable(self.bits) else self.bits)

    def planes_for(self, kwargs: Mapping[str, Any] | None = None) -> int | None:
        """Binary planes a MAC with this operand counts (see ``binary_planes``); None: float."""
        if self.bits_for(kwargs) == 1:
            return 1
        planes = self.binary_planes
        return _call_with(planes, dict(kwargs or {})) if callable(planes) else planes

    def levels_for(self, kwargs: Mapping[str, Any] | None = None) -> tuple[float, float, int] | None:
        """``(low, step, P)`` of the forward's value set: ``(-1, 2, 1)`` for ``"sign"``, the
        declared levels for ``"levels"``, None otherwise."""
        if self.forward == "sign":
            return (-1.0, 2.0, 1)
        if self.forward != "levels":
            return None
        low, step, planes = _call_with(self.levels, dict(kwargs or {})) if callable(self.levels) else self.levels
        return float(low), float(step), int(planes)

    @property
    def is_sign(self) -> bool:
        """The forward is exactly ``±1`` (``sign(0) = +1``)."""
        return self.forward == "sign"

    @property
    def is_scaled_sign(self) -> bool:
        """The forward is ``±α`` per output channel (``±1`` included)."""
        return self.forward in ("sign", "scaled_sign")


_REGISTRY: dict[str, Quantizer] = {}


def names() -> list[str]:
    """Registered quantizer names, sorted."""
    return sorted(_REGISTRY)


def register(
    name: str,
    fn: Callable[..., Array],
    *,
    bits: int | Callable[..., int],
    forward: str = "other",
    levels: tuple[float, float, int] | Callable[..., tuple[float, float, int]] | None = None,
    binary_planes: int | Callable[..., int | None] | None = None,
    schedule: Callable[..., Mapping[str, Array]] | None = None,
    schedule_outputs: tuple[str, ...] = (),
    inference: str | None = None,
    scale_equivariant: bool = False,
    overwrite: bool = False,
) -> Quantizer:
    """Register ``fn`` under ``name`` with the facts of :class:`Quantizer`; returns its descriptor.

    ``bits`` is required (a summary cannot guess it). Registering the same descriptor
    again (a module imported twice) does nothing; a different one under a taken name is
    an error unless ``overwrite=True``. ``inference`` must name a quantizer already
    registered.
    """
    q = Quantizer(
        name=name,
        fn=fn,
        bits=bits,
        forward=forward,
        levels=levels,
        binary_planes=binary_planes,
        schedule=schedule,
        schedule_outputs=schedule_outputs,
        inference=inference,
        scale_equivariant=scale_equivariant,
    )
    if inference is not None:
        target = _REGISTRY.get(inference)
        if target is None or target.inference is not None or inference == name:
            raise ConfigError(
                f"quantizer {name!r}: inference={inference!r} must name another registered quantizer that is "
                f"deployed as itself; registered: {', '.join(names())}."
            )
    old = _REGISTRY.get(name)
    if old is not None and old != q and not overwrite:
        raise ConfigError(
            f"A quantizer named {name!r} is already registered ({old.fn!r}); pass overwrite=True to replace it."
        )
    _REGISTRY[name] = q
    return q


def _import_reference(ref: str) -> Any:
    """``"package.module:attribute"`` -> the attribute (the module is imported)."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"quantizer {ref!r}: cannot import module {module_name!r} ({e}).") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"quantizer {ref!r}: module {module_name!r} has no attribute {attr!r}.") from None


def _unknown(spec) -> ConfigError:
    return ConfigError(
        f"Unknown binarizer {spec!r}; valid names are: {', '.join(names())} "
        f"(or 'package.module:function', or --import a module that registers it)."
    )


def _lookup(spec) -> tuple[Quantizer, bool]:
    """``(descriptor, declared)``: declared is False for an unregistered plain callable."""
    if isinstance(spec, Quantizer):
        return spec, True
    if isinstance(spec, str):
        if ":" in spec:
            return _lookup(_import_reference(spec))
        if spec in _REGISTRY:
            return _REGISTRY[spec], True
        raise _unknown(spec)
    if callable(spec):
        for q in _REGISTRY.values():
            if q.fn is spec:
                return q, True
        name = getattr(spec, "__name__", None) or repr(spec)
        bits = getattr(spec, "bits", 1)
        return Quantizer(name=name, fn=spec, bits=bits, binary_planes=getattr(spec, "planes", None)), False
    raise _unknown(spec)


def describe(spec) -> Quantizer | None:
    """The :class:`Quantizer` of a spec (see the module docstring); None for ``None``.

    Unknown names raise a ``ConfigError`` (a ``ValueError``) listing the registered ones.
    """
    return None if spec is None else _lookup(spec)[0]


def schedule_values(spec, kwargs: Mapping[str, Any] | None, progress: float) -> dict[str, float]:
    """The values a quantizer's ``schedule`` supplies at ``progress`` (EDE's ``t`` and ``k``,
    tanh's ``nu``), as floats; ``{}`` for a quantizer without a schedule (or ``None``).
    What the training loop logs as scalars: read from the descriptor, for any registered
    quantizer, built-in or not."""
    q = describe(spec) if spec is not None else None
    if q is None or q.schedule is None:
        return {}
    _, sched_kwargs = _split_kwargs(q, dict(kwargs or {}))
    return {k: float(v) for k, v in q.schedule(progress, **sched_kwargs).items()}


def get(name) -> Callable[..., Array]:
    """The function of a quantizer spec (``get("ede_sign")`` is ``binarizers.ede_sign``)."""
    if callable(name) and not isinstance(name, Quantizer):
        return name
    return _lookup(name)[0].fn


def deployed(spec, kwargs: Mapping[str, Any] | None = None) -> tuple[Any, dict]:
    """The spec and keyword arguments a layer uses at inference (:attr:`Quantizer.inference`).

    The one place where a quantizer is swapped for its deployed form: ``tanh_sign`` (with
    any ``nu`` keywords) becomes ``("sign", {})``; every other spec is returned as is.
    """
    kwargs = dict(kwargs or {})
    if spec is None:
        return None, kwargs
    q = describe(spec)
    if q.inference is None:
        return spec, kwargs
    return q.inference, {}


def _split_kwargs(q: Quantizer, kwargs: Mapping[str, Any]):
    """Split ``kwargs`` into the quantizer's own and its schedule's; reject unknown keys."""
    signature = inspect.signature(q.fn).parameters
    fn_params = set(signature) - {"x", "w"}
    sched_params = set(inspect.signature(q.schedule).parameters) - {"progress"} if q.schedule else set()
    # Values the schedule computes (t, k, nu) are not user settings.
    computed = set(q.schedule_outputs)
    allowed = (fn_params - computed) | sched_params
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(
            f"Unknown keyword argument(s) {sorted(unknown)} for binarizer {q.name!r}; allowed: {sorted(allowed)}."
        )
    # Fail at configuration time, not at the first forward pass inside a trace.
    required = {
        name for name in fn_params - computed if signature[name].default is inspect.Parameter.empty
    }
    missing = required - set(kwargs)
    if missing:
        raise ConfigError(f"Binarizer {q.name!r} needs the keyword argument(s) {sorted(missing)}.")
    return (
        {k: v for k, v in kwargs.items() if k in fn_params},
        {k: v for k, v in kwargs.items() if k in sched_params},
    )


def resolve(spec, **kwargs) -> Callable[[Array, Any], Array] | None:
    """Bind a quantizer spec and its keyword arguments to ``fn(x, progress)``.

    For a quantizer with a ``schedule`` the schedule keywords (``t_min``/``t_max`` for
    EDE, ``nu_0``/``nu_max`` for tanh) are split off, and ``t, k`` or ``nu`` are computed
    from ``progress`` (a traced scalar) on every call; unknown or missing keywords raise
    a ``ConfigError`` (a ``ValueError``) here, at configuration time. A registered function passed as itself
    (``resolve(ede_sign)``) is its descriptor, so it keeps its schedule. An undeclared
    callable is called as ``fn(x, **kwargs)``, with ``progress`` too when it takes one.
    ``None`` resolves to ``None`` (no quantization).
    """
    if spec is None:
        return None
    q, declared = _lookup(spec)
    fn = q.fn
    if not declared:
        if "progress" in inspect.signature(fn).parameters:
            return lambda x, progress=1.0: fn(x, progress=progress, **kwargs)
        return lambda x, progress=1.0: fn(x, **kwargs)
    fn_kwargs, sched_kwargs = _split_kwargs(q, kwargs)
    schedule = q.schedule

    def bound(x: Array, progress: float | Array = 1.0) -> Array:
        extra = schedule(progress, **sched_kwargs) if schedule is not None else {}
        return fn(x, **fn_kwargs, **extra)

    bound.__name__ = q.name
    return bound


def check_file_spec(spec, where: str) -> None:
    """Refuse a quantizer spec read from a file unless it names a registered quantizer.

    Files are data: a ``config.json`` or packed model must never make binax import a
    module or call a function it names. A registered name (``"ede_sign"``) is fine. A
    ``"package.module:attribute"`` reference is accepted only when that module is already
    imported in this process (by the user: their own code, or ``--import``) and the
    attribute is a quantizer registered there, so nothing is imported and nothing
    unregistered is called. ``where`` names the file and key for the error message.
    """
    if spec is None:
        return
    if not isinstance(spec, str):
        raise ConfigError(f"{where}: a quantizer read from a file must be a name; got {type(spec).__name__} {spec!r}.")
    if ":" not in spec:
        if spec not in _REGISTRY:
            raise ConfigError(
                f"{where}: Unknown binarizer {spec!r}; registered: {', '.join(names())} "
                "(--import the module that registers it)."
            )
        return
    module_name, _, attr = spec.partition(":")
    module = sys.modules.get(module_name)
    fn = getattr(module, attr, None) if module is not None else None
    if fn is None or not any(q.fn is fn for q in _REGISTRY.values()):
        raise ConfigError(
            f"{where}: quantizer {spec!r} names code, and binax never imports or calls what a file names; "
            f"import that module yourself (--import {module_name}) and have it register the quantizer "
            "(binax.binarizers.register), then load again."
        )


def check_file_config(config: Mapping[str, Any], where: str) -> None:
    """:func:`check_file_spec` for every ``*quantizer`` key of a (nested) config read from a file."""
    for key, value in config.items():
        if hasattr(value, "items"):
            check_file_config(value, f"{where}: {key}")
        elif key.endswith("quantizer"):
            check_file_spec(value, f"{where}: {key}")


def import_plugins(modules: Iterable[str] | str | None) -> list[ModuleType]:
    """Import modules that register quantizers (the ``--import`` flag of the commands).

    ``modules``: module names (``"mypackage.binarizers"``), or one comma-separated
    string. A module that cannot be imported is a ``ConfigError`` naming it.
    """
    if modules is None:
        return []
    if isinstance(modules, str):
        modules = [m for m in modules.split(",")]
    out = []
    for name in modules:
        name = name.strip()
        if not name:
            continue
        try:
            out.append(importlib.import_module(name))
        except ImportError as e:
            raise ConfigError(f"cannot import plugin module {name!r} ({e}); is it on PYTHONPATH?") from None
    return out
