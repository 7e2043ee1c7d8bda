"""Binarizers: pure forward/backward estimators for binary (and few-bit) networks.

Every estimator is a plain function built on ``jax.custom_vjp``: the forward is the
quantizer, the backward the paper's surrogate gradient. Each function's docstring gives
its formula and the paper it comes from; the conventions binax keeps everywhere:

* ``sign(0) = +1`` (as Larq does; ``jnp.sign(0)`` is 0).
* A kernel's LAST axis is its output channel; "per output channel" reduces over every
  other axis.
* "STE on [a, b]" means forward as stated, backward ``g * 1[a <= x <= b]``.
* Schedule values (EDE's ``t``/``k``, tanh's ``nu``, clip values) are ordinary, possibly
  traced, array arguments whose cotangent is zero. They are never ``nondiff_argnums`` and
  never Python constants baked into a trace, so moving them during training does not
  recompile.
* Outputs keep the input's dtype (float32, bfloat16, ...). Schedule arithmetic runs in
  float32 and is cast once.

The estimators live in one module per paper or family: :mod:`~binax.binarizers.ste` (the
sign, its STEs, XNOR weights), :mod:`~binax.binarizers.irnet` (EDE, Libra-PB),
:mod:`~binax.binarizers.self_binarizing` (tanh), :mod:`~binax.binarizers.levels` ({0, 1}
and few-level activations, BinaryDuo), :mod:`~binax.binarizers.abc_net` (ABC-Net); every
public name is here too (``binax.binarizers.ede_sign``). Names are a public contract
(configs and outside code call them by these names). Each binarizer is registered with
its :class:`~binax.quantizer.Quantizer` descriptor (bits, forward value set, schedule,
inference form) in this module; the registry
functions of :mod:`binax.quantizer` are re-exported here: ``get(name)`` maps config strings
to the functions, ``describe(spec)`` to the descriptors, ``register(name, fn, *, bits, ...)``
adds one, and ``resolve(spec, **kw)`` turns a spec into a ``fn(x, progress)`` that derives
schedule values from training progress.
"""

from __future__ import annotations

import jax

from binax._checks import static_int
from binax.binarizers.abc_net import abc_activation, abc_weight, abc_weight_bases
from binax.binarizers.irnet import ede_params, ede_sign, libra_pb
from binax.binarizers.levels import dorefa, duo_binary, duo_ternary, duo_weight, ste_heaviside, ste_tern
from binax.binarizers.self_binarizing import nu_schedule, tanh_sign
from binax.binarizers.ste import approx_sign, sign, ste_sign, swish_sign, xnor_weight
from binax.quantizer import Quantizer, deployed, describe, get, import_plugins, names, register, resolve

Array = jax.Array

__all__ = [
    "sign",
    "ste_sign",
    "approx_sign",
    "swish_sign",
    "ede_sign",
    "ede_params",
    "tanh_sign",
    "nu_schedule",
    "ste_heaviside",
    "duo_binary",
    "duo_ternary",
    "ste_tern",
    "dorefa",
    "xnor_weight",
    "libra_pb",
    "abc_weight_bases",
    "abc_weight",
    "duo_weight",
    "abc_activation",
    "Quantizer",
    "deployed",
    "describe",
    "get",
    "import_plugins",
    "names",
    "register",
    "resolve",
]


# ------------------------------------------------------------------------ registry


def _ede_schedule(progress, t_min: float = 0.1, t_max: float = 10.0) -> dict[str, Array]:
    t, k = ede_params(progress, t_min=t_min, t_max=t_max)
    return {"t": t, "k": k}


def _nu_schedule(
    progress, nu_0: float = 1.0, nu_max: float = 1000.0, start: float = 0.0, nu_start: float | None = None
) -> dict[str, Array]:
    return {"nu": nu_schedule(progress, nu_0=nu_0, nu_max=nu_max, start=start, nu_start=nu_start)}


def _dorefa_levels(k_bit: int = 2) -> tuple[float, float, int]:
    n = 2 ** static_int(k_bit, "k_bit") - 1
    return 0.0, 1.0 / n, n


# What each binarizer is (binax.quantizer.Quantizer): the one place that says so.
register("sign", sign, bits=1, forward="sign")
register("ste_sign", ste_sign, bits=1, forward="sign")
register("approx_sign", approx_sign, bits=1, forward="sign")
register("swish_sign", swish_sign, bits=1, forward="sign")
register("ede_sign", ede_sign, bits=1, forward="sign", schedule=_ede_schedule, schedule_outputs=("t", "k"))
# Self-Binarizing networks train tanh(nu x) and deploy its limit, sign (Lahoud & Achanta 2019).
register(
    "tanh_sign", tanh_sign, bits=1, schedule=_nu_schedule, schedule_outputs=("nu",), inference="sign"
)
register("ste_heaviside", ste_heaviside, bits=1, forward="levels", levels=(0.0, 1.0, 1))
register("duo_binary", duo_binary, bits=1, forward="levels", levels=(0.0, 1.0, 1))
# Two bits, counted as two binary activations: BinaryDuo decouples it into two.
register("duo_ternary", duo_ternary, bits=2, forward="levels", levels=(0.0, 0.5, 2), binary_planes=2)
register("ste_tern", ste_tern, bits=2, forward="levels", levels=(-1.0, 1.0, 2))
register("dorefa", dorefa, bits=lambda k_bit=2: k_bit, forward="levels", levels=_dorefa_levels)
register("xnor_weight", xnor_weight, bits=1, forward="scaled_sign", scale_equivariant=True)
register("libra_pb", libra_pb, bits=1, forward="scaled_sign", schedule=_ede_schedule, schedule_outputs=("t", "k"))
# M bases of one bit each: M bits, M binary planes (ABC-Net).
register("abc_weight", abc_weight, bits=lambda m=1: m, binary_planes=lambda m=1: m)
register("duo_weight", duo_weight, bits=1, forward="scaled_sign", scale_equivariant=True)
