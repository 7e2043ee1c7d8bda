"""Activation codes: a quantized activation at inference as binary planes.

A binarized activation is one or more planes of signs. A quantizer whose inference values
are the ``P + 1`` equally spaced levels ``L_j = low + j·Δ`` (``j = 0..P``) is written as P
binary planes (a thermometer code): ``a_p = 1[q >= low + (p − ½)Δ]``, ``p = 1..P``, and
``q = low + Δ·Σ_p a_p``. With the plane signs ``s_p = 2·a_p − 1 ∈ {−1, +1}``::

    q = low + Δ·P/2 + (Δ/2)·Σ_p s_p

so for a binary kernel ``w = α·b`` (``b ∈ {−1, +1}``, ``α`` per output channel)::

    Σ_k q_k·w_k = α·(Δ/2)·[c0·S_b + Σ_p Σ_k s_pk·b_k],   c0 = 2·low/Δ + P,  S_b = Σ_k b_k

an integer accumulator (XNOR-popcount per plane, plus a per-channel constant) times one
float per channel. The codes of binax's quantizers:

============================================  =====  ===  ===  ====
quantizer (forward)                            low    Δ    P    c0
============================================  =====  ===  ===  ====
forward "sign" (ste/approx/swish/ede_sign, …)   −1     2    1    0
ste_heaviside, duo_binary ({0, 1})               0      1    1    1
duo_ternary ({0, ½, 1})                          0      ½    2    2
ste_tern ({−1, 0, 1})                            −1     1    2    0
dorefa, k bits ({0, 1/n, …, 1}, n = 2^k − 1)     0     1/n   n    n
============================================  =====  ===  ===  ====

For ``{0, 1}`` activations this is ``a·w = (s·w + Σw)/2`` (the issue's formula). A padded
pixel of value ``v = L_j`` is the planes ``s_p = +1`` for ``p <= j``, ``−1`` above, so
convolution borders stay exact (``S_b`` then runs over every tap, padded or not).

Each quantizer is exported in its deployed form (:func:`binax.binarizers.deployed`:
Self-Binarizing's ``tanh_sign`` is registered with ``inference="sign"``), and its code
is read from that form's descriptor: ``forward="sign"`` is the first row (a user's
sign-forward binarizer too), ``forward="levels"`` gives ``(low, Δ, P)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from binax import binarizers

Array = jax.Array

__all__ = ["ActivationCode", "activation_code"]


@dataclasses.dataclass(frozen=True)
class ActivationCode:
    """Activations on the levels ``low + j·step`` (``j = 0..planes``) as binary planes.

    ``quantizer``/``kwargs`` is the inference forward (a registry name or
    ``"module:attr"``); every ``forward="sign"`` quantizer is stored as ``"sign"``.
    """

    quantizer: str
    kwargs: tuple = ()
    low: float = -1.0
    step: float = 2.0
    planes: int = 1

    @property
    def offset(self) -> int:
        """``c0 = 2·low/Δ + P``: the multiple of ``S_b`` in the integer accumulator."""
        return int(round(2 * self.low / self.step + self.planes))

    @property
    def is_sign(self) -> bool:
        return self.quantizer == "sign"

    def levels(self) -> np.ndarray:
        """The plane thresholds on the quantized value: ``low + (p − ½)·step``, ``p = 1..P``."""
        return np.asarray([self.low + (p - 0.5) * self.step for p in range(1, self.planes + 1)])

    def quantize(self, x: Array) -> Array:
        """The quantizer's inference forward (``progress`` does not change any forward here)."""
        if self.is_sign:
            return binarizers.sign(x)
        return binarizers.resolve(self.quantizer, **dict(self.kwargs))(x, 1.0)

    def plane_bits(self, x: Array) -> Array:
        """``(P, *x.shape)`` booleans: plane ``p`` is ``q(x) >= low + (p − ½)·step``."""
        if self.is_sign:
            return (x >= 0)[None]  # sign(x) >= 0 ⟺ x >= 0 (NaN -> False, as sign gives -1)
        q = self.quantize(x)
        levels = jnp.asarray(self.levels(), q.dtype).reshape((-1,) + (1,) * q.ndim)
        return q[None] >= levels

    def pad_planes(self, pad_value: float) -> tuple[int, ...] | None:
        """Per-plane ``±1`` (or 0) of a padded pixel of value ``pad_value``; None if not a level.

        A level ``L_j`` is ``+1`` in planes ``p <= j`` and ``−1`` above. With one plane, the
        midpoint ``low + Δ/2`` (0 for sign) is the plane value 0, which ``packed_conv``
        supports directly.
        """
        j = (pad_value - self.low) / self.step
        if abs(j - round(j)) < 1e-9 and 0 <= round(j) <= self.planes:
            j = int(round(j))
            return tuple(1 if p <= j else -1 for p in range(1, self.planes + 1))
        if self.planes == 1 and abs(j - 0.5) < 1e-9:
            return (0,)
        return None

    def to_json(self) -> dict:
        return {
            "quantizer": self.quantizer,
            "kwargs": dict(self.kwargs),
            "low": self.low,
            "step": self.step,
            "planes": self.planes,
        }


def activation_code(spec, kwargs: Mapping[str, Any] | None = None) -> ActivationCode | None:
    """The :class:`ActivationCode` of an input quantizer at inference, or None (float, or
    no exact code): read from its deployed form's descriptor (``forward`` ``"sign"`` or
    ``"levels"``; :func:`binax.binarizers.deployed`, :meth:`binax.quantizer.Quantizer.levels_for`)."""
    spec, kwargs = binarizers.deployed(spec, kwargs)
    q = binarizers.describe(spec)
    levels = None if q is None else q.levels_for(kwargs)
    if levels is None:
        return None
    if q.is_sign:
        return ActivationCode("sign")
    low, step, planes = levels
    return ActivationCode(spec if isinstance(spec, str) else q.name, tuple(sorted(kwargs.items())), low, step, planes)
