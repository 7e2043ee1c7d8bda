"""The one model tracer: every module call of a forward pass, in order.

``trace(model, input_shape)`` runs ``model.init`` under ``jax.eval_shape`` (nothing is
allocated or compiled) and records every module ``__call__`` with
``flax.linen.intercept_methods``: its path, the module, and its input and output shapes.
The summary counts bits and MACs from it, the exporter finds the layers to pack and the
shapes of their maps, and the gradient-mismatch study finds the input of the layer whose
pre-activations it perturbs (:func:`record_calls` around any apply).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Call", "record_calls", "trace"]


def _shape(value: Any) -> tuple[int, ...]:
    leaves = jax.tree.leaves(value)
    return tuple(leaves[0].shape) if leaves and hasattr(leaves[0], "shape") else ()


@dataclasses.dataclass(frozen=True)
class Call:
    """One module call: ``path`` (e.g. ``('stage0_block0_unit0', 'conv')``), the module (an
    unbound clone, ready for ``module.apply``), and the shapes of its first argument and
    of its output (batch axis included). ``input`` is the first argument itself when the
    recording kept values (:func:`record_calls`), else None."""

    path: tuple[str, ...]
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    input: Any = None


@contextlib.contextmanager
def record_calls(*, keep_inputs: bool = False) -> Iterator[list[Call]]:
    """Records every module ``__call__`` made inside the block, in call order (repeated
    calls of one module each get an entry). ``keep_inputs`` also keeps each call's first
    argument (concrete or traced, as it was)."""
    calls: list[Call] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            first = args[0] if args else None
            calls.append(
                Call(
                    tuple(context.module.path),
                    context.module.clone(parent=None),
                    _shape(first),
                    _shape(out),
                    first if keep_inputs else None,
                )
            )
        return out

    with nn.intercept_methods(interceptor):
        yield calls


def trace(model: nn.Module, input_shape: Sequence[int], *, progress: float = 1.0) -> tuple[list[Call], Any]:
    """``(calls, abstract variables)`` of ``model`` on one example of ``input_shape``.

    ``calls`` holds every module call of ``model.init(key, x, train=False,
    progress=progress)`` in order, the model itself included (path ``()``); the
    variables are ``jax.ShapeDtypeStruct`` leaves. Nothing is allocated.
    """
    recorded: list[Call] = []

    def init(x):
        with record_calls() as calls:
            variables = model.init(jax.random.key(0), x, train=False, progress=progress)
        recorded.extend(calls)
        return variables

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return recorded, variables
