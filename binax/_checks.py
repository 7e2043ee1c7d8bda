"""Argument checks shared across binax (static shapes and counts)."""

from __future__ import annotations

import operator


def static_int(value, what: str, minimum: int = 1) -> int:
    """A static Python/NumPy integer ``>= minimum`` (bools and floats are rejected).

    Raises a ``ValueError`` naming ``what`` and the bad value.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}; got {value!r}.")
    return n
