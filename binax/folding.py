"""BN → sign folding: a per-channel step function as one threshold compare.

``sign(BN(x))`` (and, in a packed chain, everything between two binary layers: pooling,
batch norm, activation, the next quantizer's bit planes) is, per channel, a boolean
function of one ordered value that changes at most once: ``(x >= t) XOR flip``
(BinaryBN, Lahoud & Achanta 2019; ``sign(γ(x − μ)/σ + β) = sign(γ)·sign(x − τ)``). binax
never derives ``t`` from that closed form, which can disagree with the float32
computation by an ulp at the boundary: it reads ``t`` off the computation itself, in
one of two ways over an integer key:

* :func:`scan_steps`: every key is evaluated (small domains: the integer accumulators of
  a packed layer, ``binax.export.chain``); a channel that changes back is reported as
  not monotone;
* :func:`bisect_steps`: per-channel binary search (huge domains: every float32 value by
  its order key, ``binax.transforms.fold_bn_sign``); the function must be monotone.

Both return :class:`Steps`. Host NumPy; the callers evaluate their functions under
``jit`` as the model does, so the thresholds reproduce its rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

__all__ = ["Steps", "scan_steps", "bisect_steps"]


@dataclasses.dataclass(frozen=True)
class Steps:
    """Per channel: ``value(k) = (k >= threshold) XOR flip`` on the searched keys.

    ``threshold``: the first key whose value differs from the value at the lowest key
    (int64; meaningless where ``changes`` is False). ``flip``: the value at the lowest
    key. ``changes``: False for a channel constant on the whole domain (then ``value =
    flip`` XOR True for every key, i.e. take ``threshold = −∞``). ``monotone``: False where
    a scanned channel changes more than once (the threshold form does not hold there).
    """

    threshold: np.ndarray
    flip: np.ndarray
    changes: np.ndarray
    monotone: np.ndarray

    def thresholds(self, never) -> np.ndarray:
        """``threshold`` with ``never`` (e.g. −2**30 or −inf) for constant channels."""
        return np.where(self.changes, self.threshold, never)

    @property
    def flips(self) -> np.ndarray:
        """``flip`` in the form ``value = (k >= thresholds(never)) XOR flips`` for every
        channel: a constant channel has ``k >= never`` true, so its flip is ``~value``."""
        return np.where(self.changes, self.flip, ~self.flip)


def scan_steps(values: np.ndarray, lo: int) -> Steps:
    """The steps of ``values`` (``(..., R, C)`` booleans at keys ``lo .. lo + R − 1``)."""
    values = np.asarray(values, bool)
    first = values[..., 0, :]
    changed = values ^ first[..., None, :]
    monotone = ~np.any(changed[..., :-1, :] & ~changed[..., 1:, :], axis=-2)  # never changes back
    changes = changed.any(axis=-2)
    threshold = lo + np.argmax(changed, axis=-2).astype(np.int64)
    return Steps(threshold, first, changes, monotone)


def bisect_steps(evaluate: Callable[[np.ndarray], np.ndarray], lo: int, hi: int, channels: int) -> Steps:
    """The step of a monotone per-channel function on the keys ``[lo, hi]``, by bisection.

    ``evaluate(keys)`` takes int64 keys ``(C,)``, one per channel, and returns the ``(C,)``
    booleans of each channel at its key. About ``log2(hi − lo)`` calls.
    """
    lo_keys = np.full(channels, lo, np.int64)
    first = np.asarray(evaluate(lo_keys), bool)
    changes = np.asarray(evaluate(np.full(channels, hi, np.int64)), bool) != first
    # Invariant where a channel changes: its value at `low` is `first`, at `high` it is not.
    low, high = lo_keys, np.where(changes, hi, lo).astype(np.int64)
    while np.any(high - low > 1):
        active = high - low > 1
        mid = np.where(active, low + (high - low) // 2, low)
        same = np.asarray(evaluate(mid), bool) == first
        low = np.where(active & same, mid, low)
        high = np.where(active & ~same, mid, high)
    return Steps(high, first, changes, np.ones(channels, bool))
