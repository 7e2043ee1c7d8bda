"""Model surgery: pure functions from one parameter tree to another.

* BinaryBN folding (Self-Binarizing Networks, Lahoud & Achanta 2019): a trained batch
  norm followed by ``sign`` becomes one threshold and one sign bit per channel
  (:func:`fold_bn_sign`, :func:`fold_binary_bn`), applied by
  :class:`binax.layers.BinaryBatchNorm`.
* Deployed quantizers: every quantizer in the form it runs at inference
  (:func:`inference_model`: Self-Binarizing's ``tanh(nu x)`` becomes ``sign``), then
  BinaryBN folding (:func:`self_binarizing_inference`).
* BinaryDuo decoupling (Kim et al. ICLR 2020): a network trained with the coupled
  ternary activation becomes the binary network whose coupled layers' outputs are
  copied twice (weights tied, as the official ``nn.Replicate``), computing the same
  function with the same binary-op count (:func:`decouple_binaryduo`,
  :func:`decouple_binaryduo_model`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, unfreeze

from binax import binarizers, folding, models

__all__ = [
    "fold_bn_sign",
    "binary_bn_paths",
    "fold_binary_bn_variables",
    "fold_binary_bn",
    "inference_model",
    "self_binarizing_inference",
    "DUO_SHIFT",
    "binaryduo_couplings",
    "decouple_binaryduo",
    "decouple_binaryduo_model",
]


# ---------------------------------------------------------------- float32 order keys

_SIGN_BIT = np.int64(0x80000000)
_MAX_KEY = int(0x7F7FFFFF)  # float32 max


def _from_key(k: np.ndarray) -> np.ndarray:
    """int64 order key -> float32: keys ``-_MAX_KEY .. _MAX_KEY`` are the finite floats in
    increasing order (the key of a float is its bit pattern, negated for negative floats;
    -0.0 and +0.0 share key 0)."""
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

    # The statistics are jit ARGUMENTS, as in a model's jitted apply: closed over, XLA
    # would constant-fold rsqrt(var + eps) * scale with different rounding.
    @jax.jit
    def nonnegative(variables, x):
        return bn.apply(variables, x[None, :])[0] >= 0

    # y is monotone in x per channel (every rounded operation is), so sign(BN(x)) steps
    # once: bisect the finite float32 values by their order keys.
    steps = folding.bisect_steps(
        lambda keys: np.asarray(nonnegative(variables, _from_key(keys))), -_MAX_KEY, _MAX_KEY, scale.shape[0]
    )
    threshold = _from_key(np.where(steps.changes, steps.threshold, 0)).astype(np.float32)
    threshold = np.where(steps.changes, threshold, -np.inf).astype(np.float32)
    return threshold, np.where(steps.flips, -1.0, 1.0).astype(np.float32)


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
    flat = traverse_util.flatten_dict(unfreeze(shapes.get("params", {})))
    leaves: dict[tuple[str, ...], set[str]] = {}
    for path in flat:
        leaves.setdefault(path[:-1], set()).add(path[-1])
    return [module for module, names in leaves.items() if names == {"threshold", "sign"}]


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


# ----------------------------------------------------------- BinaryDuo decoupling

#: BinaryDuo's activation thresholds: ternary levels at 0.25 / 0.75, binary at 0.5.
DUO_SHIFT = 0.25


def _kernel_key(layer_params: Mapping[str, Any], layer: str) -> str:
    for key in ("latent_kernel", "kernel"):
        if key in layer_params:
            return key
    raise ValueError(f"layer {layer!r} has no 'latent_kernel' or 'kernel' parameter; it has {sorted(layer_params)}.")


def _duplicate_last(a: jax.Array) -> jax.Array:
    return jnp.concatenate([a, a], axis=-1)


def _split_halves_input(kernel: jax.Array, channels: int) -> jax.Array:
    """``(..., S*C, out)`` or ``(kh, kw, C, out)`` → the same with the C axis doubled, w/2 in both."""
    out = kernel.shape[-1]
    k = kernel.reshape(-1, channels, out)
    k = jnp.concatenate([k, k], axis=1) / 2
    new_in = kernel.shape[:-2] + (kernel.shape[-2] * 2,)
    return k.reshape(new_in + (out,))


def decouple_binaryduo(
    variables: Mapping[str, Any], couplings: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """BinaryDuo decoupling (Kim et al. ICLR 2020) of a trained coupled-ternary network.

    For each ``(producer, bn, consumer)`` — a layer whose batch-normed output ``y`` the
    consumer reads through ``duo_ternary`` — returns variables of the decoupled network,
    in which the producer's C output channels are copied (C → 2C, ``replicate=2`` in the
    model) before the batch norm and the consumer reads ``duo_binary`` of the 2C channels:

    * the producer's kernel is unchanged: both copies of a channel share it (tied), as in
      the official ``tinyVGG7_decoupled.lua`` (``nn.Replicate``), so the decoupled
      network has the coupled one's binary-op count while it is fine-tuned;
    * the batch norm's γ, μ, σ² are copied to both halves; β becomes β + 0.25 in the
      first half and β − 0.25 in the second, so ``1[y + 0.25 >= 0.5] = 1[y >= 0.25]`` and
      ``1[y − 0.25 >= 0.5] = 1[y >= 0.75]`` (the official code puts −0.25 first; the
      order is immaterial);
    * the consumer's kernel is copied into both input halves as ``w/2``, so
      ``w/2 · 1[y >= 0.25] + w/2 · 1[y >= 0.75] = w · ternary(y)``.

    The decoupled network computes what the coupled one did, provided the consumer's
    weight binarizer is scale-equivariant (``duo_weight``, ``xnor_weight`` or none):
    halving the latent kernel must halve its binarized value. Spatial layouts are
    handled: a dense consumer after a flatten of ``(H, W, 2C)`` gets its rows split per
    pixel. ``variables`` holds ``params`` and ``batch_stats``; a new dict is returned.
    """
    params = unfreeze(variables["params"])
    stats = unfreeze(variables.get("batch_stats", {}))
    for producer, bn, consumer in couplings:
        for name in (producer, bn, consumer):
            if name not in params:
                raise ValueError(f"no layer {name!r} in params; layers are {sorted(params)}.")
        channels = params[producer][_kernel_key(params[producer], producer)].shape[-1]
        beta = params[bn]["bias"]
        params[bn]["bias"] = jnp.concatenate([beta + DUO_SHIFT, beta - DUO_SHIFT], axis=-1)
        params[bn]["scale"] = _duplicate_last(params[bn]["scale"])
        stats[bn] = {k: _duplicate_last(v) for k, v in stats[bn].items()}
        ck = _kernel_key(params[consumer], consumer)
        params[consumer][ck] = _split_halves_input(params[consumer][ck], channels)
    return {"params": params, "batch_stats": stats}


def _chain(model: nn.Module) -> list:
    """The model's layer chain (``model.chain()``, :class:`binax.models.common.Step`)."""
    chain = model.chain() if hasattr(model, "chain") else None
    if chain is None:
        name = models.registry_name(model) or type(model).__name__
        raise ValueError(
            f"BinaryDuo decoupling needs a model described by a layer chain (model.chain(): bnn_mlp, the VGG "
            f"family, alexnet); {name}'s chain() is None."
        )
    return chain


def binaryduo_couplings(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(producer, bn, consumer)`` for every batch norm whose output a binarized layer reads.

    Read off the model's layer chain (``model.chain()``: ``bnn_mlp``, the VGG family,
    ``alexnet``): layer → (pool) → BN → activation → next layer. The first layer reads
    pixels; the classifier is a consumer only when ``last_layer_float=False``.
    """
    chain = _chain(model)
    out = []
    for i, step in enumerate(chain):
        if step.kind != "block":
            continue
        producer = next((s for s in reversed(chain[:i]) if s.kind == "layer"), None)
        consumer = next((s for s in chain[i + 1 :] if s.kind == "layer"), None)
        if producer is not None and consumer is not None and consumer.quantize_input:
            out.append((producer.path[-1], step.path[-1], consumer.path[-1]))
    return out


def _decouples(spec, kwargs) -> bool:
    """Whether ``q(y) = (duo_binary(y + ¼) + duo_binary(y − ¼)) / 2``, the identity the
    decoupling rests on, holds for the quantizer ``spec``: checked on its own forward on
    a grid through both thresholds (its values decide, not its name)."""
    q = binarizers.resolve(spec, **dict(kwargs or {}))
    if q is None:
        return False
    y = np.arange(-1024, 2049) / 1024  # [-1, 2] in exact binary steps, both thresholds among them
    want = ((y + DUO_SHIFT >= 0.5).astype(np.float32) + (y - DUO_SHIFT >= 0.5)) / 2
    return bool(np.array_equal(np.asarray(q(jnp.asarray(y, jnp.float32), 1.0)), want))


# Activations that leave 1[y >= 0.25] and 1[y >= 0.75] unchanged.
_DUO_SAFE_ACTIVATIONS = ("none", "hardtanh", "relu")


def decouple_binaryduo_model(model: nn.Module, variables: Mapping) -> tuple[nn.Module, dict, dict]:
    """Decouple a trained ``duo_ternary`` model into its ``duo_binary`` twin.

    Returns ``(model, variables, overrides)``: the decoupled module, its variables and the
    config overrides that build it with ``binax.models.create`` (explicit widths,
    ``width_multiplier=1``, ``replicate=2``, ``input_quantizer='duo_binary'``). The
    coupled layers keep their widths; their outputs are copied (weights tied), so the
    decoupled model's binary operations equal the coupled model's (``binax.summary``'s
    ``binary_ops``: a ternary input is two binary planes). In eval mode the decoupled
    model's binary activations reproduce the coupled ternary ones exactly
    (``ternary(y) = (binary(y + 0.25) + binary(y − 0.25)) / 2``), so its logits equal the
    coupled model's up to float summation order. See :func:`decouple_binaryduo`.
    """
    if not _decouples(model.input_quantizer, model.input_quantizer_kwargs):
        raise ValueError(
            f"decoupling needs a coupled model whose input quantizer is BinaryDuo's ternary activation (duo_ternary: "
            f"q(y) = (duo_binary(y + {DUO_SHIFT}) + duo_binary(y - {DUO_SHIFT})) / 2); got {model.input_quantizer!r}."
        )
    kq = binarizers.describe(model.kernel_quantizer)
    if kq is not None and not kq.scale_equivariant:
        equivariant = [n for n in binarizers.names() if binarizers.describe(n).scale_equivariant]
        raise ValueError(
            f"decoupling halves the consumer's latent weights, which needs a scale-equivariant "
            f"weight binarizer ({', '.join(equivariant)} or None); got {model.kernel_quantizer!r}."
        )
    if model.activation not in _DUO_SAFE_ACTIVATIONS or getattr(model, "binary_bn", False):
        raise ValueError(
            f"decoupling needs activation in {_DUO_SAFE_ACTIVATIONS} and binary_bn=False; got "
            f"activation={model.activation!r}, binary_bn={getattr(model, 'binary_bn', False)!r}."
        )
    couplings = binaryduo_couplings(model)
    if getattr(model, "replicate", None) != 1:
        raise ValueError(
            f"tied decoupling copies the coupled layers' outputs through the model's replicate field "
            f"(bnn_mlp and the VGG family, at replicate=1 while coupled); {type(model).__name__} has "
            f"replicate={getattr(model, 'replicate', 'no such field')!r}."
        )
    new_vars = decouple_binaryduo(variables, couplings)
    params = new_vars["params"]

    def width(name: str) -> int:
        return int(params[name][_kernel_key(params[name], name)].shape[-1])

    overrides: dict[str, Any] = {
        "width_multiplier": 1.0,
        "replicate": 2,
        "input_quantizer": "duo_binary",
        "input_quantizer_kwargs": {},
    }
    # Every layer's width, explicit: (config key, index) -> the decoupled kernel's outputs.
    for step in _chain(model):
        if step.kind == "layer" and step.width is not None:
            key, index = step.width
            widths = list(overrides.get(key, getattr(model, key)))
            widths[index] = width(step.path[-1])
            overrides[key] = tuple(widths)
    frozen = {k: (FrozenDict(v) if isinstance(v, dict) else v) for k, v in overrides.items()}
    return model.clone(**frozen), new_vars, overrides


def inference_model(model: nn.Module) -> nn.Module:
    """``model`` as it runs at inference: every quantizer in its deployed form
    (:func:`binax.models.inference_overrides`, :func:`binax.binarizers.deployed`: e.g.
    Self-Binarizing's ``tanh_sign`` becomes ``sign``); the model itself when nothing
    changes. The summary, the exporter and model surgery all deploy through it."""
    changes = models.inference_overrides(model)
    if not changes:
        return model
    return model.clone(parent=None, **{k: models.common.freeze(v) for k, v in changes.items()})


def self_binarizing_inference(
    model: nn.Module, variables: Mapping, input_shape: Sequence[int]
) -> tuple[nn.Module, dict]:
    """Self-Binarizing end state: ``sign`` in place of tanh, BinaryBN in place of BN → sign.

    Lahoud & Achanta (2019) train with ``tanh(nu x)`` on weights and activations, nu
    growing so tanh approaches sign, and deploy with ``sign`` (``tanh_sign``'s descriptor
    says so: ``inference="sign"``): :func:`inference_model`, then :func:`fold_binary_bn`.
    A model with no quantizer deployed in another form is a ``ValueError``. Its
    predictions equal the trained model's at nu_max when nu_max is large enough that
    ``tanh(nu x)`` and ``sign(x)`` agree on the data (measure the agreement rate).
    """
    deployed = inference_model(model)
    if deployed is model:
        raise ValueError(
            f"{type(model).__name__} has no quantizer deployed in another form, such as tanh_sign (input_quantizer="
            f"{model.input_quantizer!r}, kernel_quantizer={model.kernel_quantizer!r})."
        )
    return fold_binary_bn(deployed, variables, input_shape)
