"""Model surgery: pure functions from one parameter tree to another.

* BinaryBN folding (Self-Binarizing Networks, Lahoud & Achanta 2019): a trained batch
  norm followed by ``sign`` becomes one threshold and one sign bit per channel
  (:func:`fold_bn_sign`, :func:`fold_binary_bn`), applied by
  :class:`binax.layers.BinaryBatchNorm`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

__all__ = ["fold_bn_sign", "binary_bn_paths", "fold_binary_bn_variables", "fold_binary_bn"]


# ---------------------------------------------------------------- float32 order keys

_SIGN_BIT = np.int64(0x80000000)
_ABS_MASK = np.int64(0x7FFFFFFF)
_INF_KEY = np.int64(0x7F800000)
_MAX_KEY = np.int64(0x7F7FFFFF)  # float32 max


def _to_key(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 key, monotone in the float order (-0.0 and +0.0 share key 0)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.int64)
    return np.where(bits & _SIGN_BIT, -(bits & _ABS_MASK), bits)


def _from_key(k: np.ndarray) -> np.ndarray:
    bits = np.where(k < 0, (-k) | _SIGN_BIT, k).astype(np.uint32)
    return bits.view(np.float32)


# ------------------------------------------------------------------- BinaryBN folding


def fold_bn_sign(
    scale: Any, bias: Any, mean: Any, var: Any, epsilon: float = 1e-5
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``sign(BN(x))`` into a per-channel ``(threshold, sign)`` pair.

    Mathematically ``sign(γ(x − μ)/σ + β) = sign(γ)·sign(x − τ)`` with
    ``τ = μ − β·σ/γ``, ``σ = sqrt(var + ε)``, and for ``γ = 0`` the constant ``sign(β)``
    (binax's ``sign(0) = +1`` throughout).

    That closed form can disagree with the float32 batch norm at the boundary by an ulp,
    so the threshold is not computed from it: for each channel the batch norm as Flax
    evaluates it, ``y(x) = ((x − μ)·(rsqrt(var + ε)·γ)) + β`` in float32, is monotone in
    ``x`` (every rounded operation is), and a binary search over the float32 values finds
    the exact boundary: the smallest ``x`` with ``y(x) >= 0`` (γ >= 0) or ``y(x) < 0``
    (γ < 0). :class:`binax.layers.BinaryBatchNorm` outputs ``s`` where ``x >= τ`` and
    ``−s`` elsewhere, which then equals ``sign(BN(x))`` for every finite float32 ``x``.
    (Constant channels get ``τ = −inf``; ``±inf`` inputs, for which the batch norm itself
    can produce NaN, are outside the guarantee.) The search evaluates Flax's own ``nn.BatchNorm`` under ``jit``
    on the default backend, so it reproduces that backend's rounding (e.g. a fused
    multiply-add: XLA:CPU and XLA:GPU fuse ``(x − μ)·m + β`` into an FMA under ``jit``).
    The threshold therefore matches the batch norm as a jitted model computes it (how
    binax trains, evaluates and exports). Flax's BN run op by op (no ``jit``) rounds
    without the FMA and can differ from it, and so from any single threshold, by one ulp
    at the boundary.

    Args: per-channel ``scale`` (γ), ``bias`` (β), running ``mean`` (μ) and ``var``, all of
    shape ``(C,)``, and the batch norm's ``epsilon``.
    Returns: ``threshold`` (τ, float32, may be ±inf) and ``sign`` (s, float32 in {−1, +1}).
    """
    scale, bias, mean, var = (np.asarray(a, np.float32) for a in (scale, bias, mean, var))
    if not (scale.shape == bias.shape == mean.shape == var.shape and scale.ndim == 1):
        raise ValueError(
            "fold_bn_sign needs 1-D scale, bias, mean and var of equal length; got shapes "
            f"{scale.shape}, {bias.shape}, {mean.shape}, {var.shape}."
        )
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    bn = nn.BatchNorm(use_running_average=True, epsilon=epsilon)
    # gamma >= 0 (incl. -0.0): y is non-decreasing, find where y >= 0 starts; gamma < 0:
    # y is non-increasing, find where y < 0 starts. Either predicate is monotone in x.
    decreasing = scale < 0

    # The statistics are jit ARGUMENTS, as in a model's jitted apply: closed over, XLA
    # would constant-fold rsqrt(var + eps) * scale with different rounding.
    @jax.jit
    def predicate(variables, x):
        y = bn.apply(variables, x[None, :])[0]
        return jnp.where(decreasing, y < 0, y >= 0)

    # Search the finite floats; the sentinels are the keys of -inf (false) and +inf (true).
    lo = np.full(scale.shape, -_INF_KEY)
    hi = np.full(scale.shape, _INF_KEY)
    while np.any(hi - lo > 1):
        active = hi - lo > 1
        mid = np.where(active, lo + (hi - lo) // 2, -_MAX_KEY)  # finished channels: any finite key
        p = np.asarray(predicate(variables, _from_key(mid)))
        hi = np.where(active & p, mid, hi)
        lo = np.where(active & ~p, mid, lo)
    s = np.where(decreasing, -1.0, 1.0).astype(np.float32)
    never = hi == _INF_KEY  # predicate false on every finite x: constant output -s
    always = hi == -_MAX_KEY  # true on every finite x: constant output s
    threshold = np.where(never | always, -np.inf, _from_key(hi)).astype(np.float32)
    return threshold, np.where(never, -s, s).astype(np.float32)


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def _delete(tree: dict, path: Sequence[str]) -> None:
    parents = [tree]
    for k in path[:-1]:
        parents.append(parents[-1][k])
    del parents[-1][path[-1]]
    # Drop parents left empty, so the tree matches the folded model's variables.
    for depth in range(len(path) - 1, 0, -1):
        if not parents[depth]:
            del parents[depth - 1][path[depth - 1]]


def binary_bn_paths(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, ...]]:
    """Module paths of every ``BinaryBatchNorm`` in ``model`` (found by shape evaluation).

    ``input_shape`` is one example's shape, e.g. ``(28, 28, 1)``.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    found = []

    def walk(tree, path):
        if isinstance(tree, Mapping):
            if set(tree) == {"threshold", "sign"}:
                found.append(tuple(path))
                return
            for k, v in tree.items():
                walk(v, path + [k])

    walk(shapes.get("params", {}), [])
    return found


def fold_binary_bn_variables(
    variables: Mapping, paths: Sequence[Sequence[str]], epsilon: float = 1e-5
) -> dict:
    """Replace the batch norm at each path by its folded ``{threshold, sign}`` parameters.

    Pure: returns new variables; ``params[path]`` becomes ``{'threshold', 'sign'}`` and
    ``batch_stats[path]`` is removed.
    """
    out = jax.tree.map(lambda a: a, unfreeze(variables))  # copy the containers, share leaves
    for path in paths:
        path = tuple(path)
        params, stats = _get(out["params"], path), _get(out["batch_stats"], path)
        threshold, s = fold_bn_sign(params["scale"], params["bias"], stats["mean"], stats["var"], epsilon)
        _set(out["params"], path, {"threshold": jnp.asarray(threshold), "sign": jnp.asarray(s)})
        _delete(out["batch_stats"], path)
    if "batch_stats" in out and not out["batch_stats"]:
        del out["batch_stats"]
    return out


# sign(act(y)) == sign(y) for these, so BN -> act -> sign is still BN -> sign.
_SIGN_PRESERVING = ("none", "hardtanh", "tanh")


def fold_binary_bn(model: nn.Module, variables: Mapping, input_shape: Sequence[int]) -> tuple[nn.Module, dict]:
    """Fold every BN -> sign pair of a trained model into ``BinaryBatchNorm`` layers.

    ``model`` must have a ``binary_bn`` field (``bnn_mlp`` and the VGG family do) and
    binarize with a sign-like forward (``sign``, ``ste_sign``, ``ede_sign``, ...; a
    Self-Binarizing ``tanh_sign`` model is first switched to ``sign``). Returns the
    ``binary_bn=True`` model and its variables; its logits equal the original model's
    inference logits.
    """
    if not hasattr(model, "binary_bn"):
        raise ValueError(f"{type(model).__name__} has no binary_bn option; BinaryBN folding needs BN -> sign pairs.")
    if getattr(model, "activation", "none") not in _SIGN_PRESERVING:
        raise ValueError(
            f"BinaryBN folding needs an activation that keeps the sign of the BN output "
            f"({', '.join(_SIGN_PRESERVING)}); got activation={model.activation!r}."
        )
    folded = model.clone(binary_bn=True)
    paths = binary_bn_paths(folded, input_shape)
    return folded, fold_binary_bn_variables(variables, paths, model.bn_epsilon)
