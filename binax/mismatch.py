"""Gradient mismatch: how far a binarizer's backward estimator is from a true descent direction.

The loss of a quantized network is piecewise constant in its latent weights and in the
pre-activations of its binary activations, so its true gradient is zero almost
everywhere. BinaryDuo (Kim et al., ICLR 2020) measures an estimator against the gradient of
the *smoothed* loss

    L_σ(θ) = E_{ε ~ N(0, I)} L(θ + σ ε),

whose gradient exists and is estimated by Monte-Carlo with antithetic pairs

    ∇L_σ(θ) ≈ 1/N Σ_i ε_i (L(θ + σ ε_i) − L(θ − σ ε_i)) / (2σ).

The metric is the cosine similarity, per layer, between an estimator's gradient and the
smoothed gradient, as a function of σ. This module works for ANY binarizer and any loss: it
only needs ``loss_fn(params) -> scalar`` (weight smoothing) or a loss of an additive
perturbation of one layer's input (activation smoothing, see ``input_perturbation``).

Layers of the module:

* ``smoothed_grad`` (with ``separable=True`` for per-example losses),
  ``coordinate_discrete_grad``: the references; ``cosine``, ``cosine_with_ci``,
  ``per_layer_cosine``, ``group_similarities`` (raw and Monte-Carlo-noise-corrected
  cosine with jackknife intervals): the metric. Both model-free, in
  :mod:`binax.smoothing`, and re-exported here.
* ``input_perturbation``, ``module_input``: a layer's pre-activation, perturbed or read.
* ``make_loss``, ``estimator_grad``, ``compare_estimators``: the same on a
  ``binax.models`` network whose ``input_quantizer`` is swapped among estimators
  (``sign_estimators``, ``MULTILEVEL_ACTIVATIONS``, ``fixed_ede``, ``fixed_tanh``).

The study itself (training the networks with ``binax.train``, the data, the tables) is
an experiment: ``binax.mismatch_study`` (the command ``python -m experiments.mismatch`` and
the notebooks); see docs/mismatch.md.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from binax import binarizers, models
from binax.smoothing import (  # re-exported: binax.mismatch is where the study's readers look
    PyTree,
    Similarity,
    SmoothedGradient,
    coordinate_discrete_grad,
    cosine,
    cosine_with_ci,
    group_similarities,
    layer_name,
    per_layer_cosine,
    smoothed_grad,
)

__all__ = [
    "SmoothedGradient",
    "Similarity",
    "smoothed_grad",
    "coordinate_discrete_grad",
    "cosine",
    "cosine_with_ci",
    "layer_name",
    "per_layer_cosine",
    "group_similarities",
    "input_perturbation",
    "module_input_shape",
    "module_input",
    "fixed_ede",
    "fixed_tanh",
    "sign_estimators",
    "MULTILEVEL_ACTIVATIONS",
    "deployed_forward",
    "cross_entropy",
    "selected_params",
    "make_loss",
    "estimator_grad",
    "compare_estimators",
]


# ---------------------------------------------------------- activation perturbations


def input_perturbation(module_path: str):
    """An interceptor factory that adds ``delta`` to the input of one submodule.

    ``module_path`` is the '/'-joined Flax module path (e.g. ``'BinaryDense_1'``); the
    module's ``__call__`` receives ``x + delta``. The gradient of the loss with respect to
    ``delta`` at 0 is then the gradient with respect to that layer's pre-activation (the
    input of its activation binarizer), as the estimator's backward computes it; the
    smoothed loss over ``delta`` is the activation smoothing BinaryDuo's analysis is about.

    Usage::

        with input_perturbation('BinaryDense_1')(delta):
            logits = model.apply(variables, x, ...)
    """

    def with_delta(delta):
        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and "/".join(mod.scope.path) == module_path:
                args = (args[0] + delta.astype(args[0].dtype),) + tuple(args[1:])
            return next_fun(*args, **kwargs)

        return nn.intercept_methods(interceptor)

    return with_delta


def _first_input(apply_fn: Callable[[], Any], module_path: str, run: Callable) -> jax.Array:
    def wrapped():
        with models.record_calls(keep_inputs=True) as calls:
            apply_fn()
        for call in calls:
            if "/".join(call.path) == module_path:
                return call.input
        raise ValueError(
            f"No module at path {module_path!r} was called; called: {sorted({'/'.join(c.path) for c in calls})}."
        )

    return run(wrapped)


def module_input_shape(apply_fn: Callable[[], Any], module_path: str) -> tuple[int, ...]:
    """Shape of the first input that ``module_path`` receives when ``apply_fn()`` runs."""
    return tuple(_first_input(apply_fn, module_path, jax.eval_shape).shape)


def module_input(apply_fn: Callable[[], Any], module_path: str) -> jax.Array:
    """The first input ``module_path`` receives when ``apply_fn()`` runs (its pre-activation,
    before its input binarizer), e.g. to look at the values an estimator's backward sees."""
    return _first_input(apply_fn, module_path, lambda f: f())


# ------------------------------------------------------- estimators on a real model

def fixed_ede(t: float, **overrides) -> dict:
    """Model overrides for ``ede_sign`` frozen at ``t`` (``k = max(1/t, 1)``): t_min = t_max = t."""
    return {"input_quantizer": "ede_sign", "input_quantizer_kwargs": {"t_min": t, "t_max": t}, **overrides}


def fixed_tanh(nu: float, **overrides) -> dict:
    """Model overrides for ``tanh_sign`` frozen at ``nu``: nu_0 = nu_max = nu."""
    return {"input_quantizer": "tanh_sign", "input_quantizer_kwargs": {"nu_0": nu, "nu_max": nu}, **overrides}


def sign_estimators(ede_t: Sequence[float] = (1.0, 10.0), tanh_nu: Sequence[float] = (5.0,)) -> dict[str, dict]:
    """The backward estimators of a sign activation, as model overrides by label.

    STE (identity backward, ``ste_sign(clip_value=None)``), clipped STE (``1[|x| <= 1]``),
    ApproxSign, SwishSign (β = 5), EDE at each ``t`` and tanh at each ``nu``.
    """
    out = {
        "STE": {"input_quantizer": "ste_sign", "input_quantizer_kwargs": {"clip_value": None}},
        "clipped STE": {"input_quantizer": "ste_sign", "input_quantizer_kwargs": {"clip_value": 1.0}},
        "ApproxSign": {"input_quantizer": "approx_sign", "input_quantizer_kwargs": {}},
        "SwishSign": {"input_quantizer": "swish_sign", "input_quantizer_kwargs": {"beta": 5.0}},
    }
    out.update({f"EDE t={t:g}": fixed_ede(t) for t in ede_t})
    out.update({f"tanh ν={nu:g}": fixed_tanh(nu) for nu in tanh_nu})
    return out


#: Networks whose activation has a different forward (ternary / 2-bit / {0, 1}), each with
#: the straight-through backward it is trained with; compared against the smoothed
#: gradient of their OWN loss.
MULTILEVEL_ACTIVATIONS: dict[str, dict] = {
    "duo_binary {0,1}": {"input_quantizer": "duo_binary", "input_quantizer_kwargs": {}},
    "duo_ternary {0,½,1}": {"input_quantizer": "duo_ternary", "input_quantizer_kwargs": {}},
    "ste_tern θ=0.5": {"input_quantizer": "ste_tern", "input_quantizer_kwargs": {"threshold_value": 0.5}},
    "dorefa k=2": {"input_quantizer": "dorefa", "input_quantizer_kwargs": {"k_bit": 2}},
}


def deployed_forward(overrides: dict, model_name: str) -> dict:
    """The model overrides whose loss an estimator is measured against.

    Each quantizer is taken in its deployed form (``binax.binarizers.deployed``:
    ``tanh_sign`` is deployed as sign); every one whose (deployed) forward is ``"sign"``
    (a sign-forward estimator, the built-in ones or a user's) maps to the plain ``sign``
    network, so they all share one smoothed loss; any other quantizer is measured against
    its own forward.
    """
    config = models.get_config(model_name)
    out = dict(overrides)
    for field in ("input_quantizer", "kernel_quantizer"):
        spec, kwargs = binarizers.deployed(out.get(field, config[field]), out.get(field + "_kwargs"))
        if spec is not None and binarizers.describe(spec).is_sign:
            out[field], out[field + "_kwargs"] = "sign", {}
        elif spec != out.get(field, config[field]):
            out[field], out[field + "_kwargs"] = spec, kwargs
    return out


def _canonical(value) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_canonical(value[k])}" for k in sorted(value)) + "}"
    return repr(value)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def selected_params(params: PyTree, layer: str | None = None) -> dict[str, jax.Array]:
    """The parameters weight smoothing perturbs, as a flat ``{'fc1/latent_kernel': array}``.

    ``layer=None``: every ``latent_kernel`` (the binary weights). ``layer='fc1'``: that
    module's kernel (``latent_kernel`` or, for a float layer, ``kernel``).
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    if layer is None:
        out = {k: v for k, v in flat.items() if k.endswith("/latent_kernel")}
    else:
        out = {k: v for k, v in flat.items() if k in (f"{layer}/latent_kernel", f"{layer}/kernel")}
    if not out:
        raise ValueError(
            f"No {'latent_kernel' if layer is None else repr(layer) + ' kernel'} among the "
            f"parameters; they are: {sorted(flat)}."
        )
    return out


def make_loss(
    model: nn.Module,
    variables: PyTree,
    x: jax.Array,
    labels: jax.Array,
    *,
    wrt: str = "weights",
    layer: str | None = None,
    progress: float = 1.0,
    per_example: bool = False,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    max_channels: int | None = None,
    seed: int = 0,
) -> tuple[Callable[[PyTree], jax.Array], PyTree]:
    """``(loss_fn, point)``: the loss as a function of what is smoothed, and where.

    ``wrt='weights'``: ``point = selected_params(params, layer)``; ``loss_fn`` swaps those
    leaves into ``variables``. ``wrt='activations'``: ``point`` is a zero array shaped like
    the input of module ``layer`` (its pre-activation, before its input binarizer), and
    ``loss_fn(delta)`` runs the model with ``delta`` added there (``input_perturbation``).
    The model runs in inference mode (batch norm with running statistics), so examples do
    not interact; ``per_example=True`` returns the vector of per-example losses instead of
    their mean (for ``smoothed_grad(..., separable=True)``).

    ``max_channels`` (weights only): perturb just that many output channels of each kernel,
    drawn without replacement by ``numpy.random.default_rng(seed)`` (the same for every
    call with the same seed); ``point`` then holds those columns only. The Monte-Carlo
    error of ∇L_σ grows with the dimension smoothed (≈ d/N), so a subspace of a few
    thousand weights is what a few thousand samples resolve. Its smoothed loss averages
    over those coordinates only: a partial smoothing, compared on those coordinates.
    """
    x = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(labels)
    progress = jnp.float32(progress)
    reduce = (lambda v: v) if per_example else jnp.mean
    if wrt == "weights":
        flat = traverse_util.flatten_dict(variables["params"], sep="/")
        full = selected_params(variables["params"], layer)
        columns = _channel_subsets(full, max_channels, seed)
        point = {k: v[..., columns[k]] for k, v in full.items()}
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss_fn(selected):
            selected = {k: jnp.asarray(full[k]).at[..., columns[k]].set(v) for k, v in selected.items()}
            params = traverse_util.unflatten_dict({**flat, **selected}, sep="/")
            logits = model.apply({**rest, "params": params}, x, train=False, progress=progress)
            return reduce(loss(logits, labels))

        return loss_fn, point
    if wrt == "activations":
        if layer is None:
            raise ValueError("wrt='activations' needs layer, the module whose input is perturbed (e.g. 'fc1').")
        shape = module_input_shape(lambda: model.apply(variables, x, train=False, progress=progress), layer)
        perturb = input_perturbation(layer)

        def loss_fn(delta):
            with perturb(delta):
                logits = model.apply(variables, x, train=False, progress=progress)
            return reduce(loss(logits, labels))

        return loss_fn, jnp.zeros(shape, jnp.float32)
    raise ValueError(f"wrt must be 'weights' or 'activations'; got {wrt!r}.")


def _channel_subsets(kernels: Mapping[str, jax.Array], max_channels: int | None, seed: int) -> dict[str, np.ndarray]:
    """Sorted output-channel indices per kernel: all of them, or ``max_channels`` drawn at random."""
    if max_channels is not None and max_channels < 1:
        raise ValueError(f"max_channels must be >= 1 or None; got {max_channels}.")
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(kernels):
        c = kernels[name].shape[-1]
        out[name] = np.arange(c) if max_channels is None or max_channels >= c else np.sort(
            rng.choice(c, max_channels, replace=False))
    return out


def estimator_grad(model: nn.Module, variables: PyTree, x, labels, **kwargs) -> PyTree:
    """The gradient the model's backward estimators give for the mean loss.

    Same arguments as ``make_loss`` (``wrt``, ``layer``, ``progress``, ``loss``,
    ``max_channels``, ``seed``); the result is shaped like its ``point``:
    ``{'fc1/latent_kernel': ...}`` for weights, the layer's input shape for activations.
    """
    loss_fn, point = make_loss(model, variables, x, labels, **kwargs)
    return jax.jit(jax.grad(loss_fn))(point)


def compare_estimators(
    model_name: str,
    model_overrides: Mapping[str, Any],
    variables: PyTree,
    batch: tuple[Any, Any] | Mapping[str, Any],
    estimators: Mapping[str, Mapping[str, Any]],
    sigmas: Sequence[float],
    num_samples: int | Sequence[int],
    *,
    wrt: str = "weights",
    layer: str | None = None,
    progress: float = 1.0,
    seed: int = 0,
    chunk_size: int = 32,
    num_groups: int = 8,
    references: Mapping[str, Mapping[str, Any]] | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    max_channels: int | None = None,
) -> list[dict]:
    """Cosine similarity between each estimator's gradient and ∇L_σ, per layer, σ and N.

    ``estimators`` maps a label to model overrides (typically ``input_quantizer`` and its
    kwargs) applied on top of ``model_overrides``; every model shares ``variables``. Each
    estimator is measured against the smoothed loss of ``references[label]`` (default
    ``deployed_forward``: the sign network for every sign-forward estimator and for tanh,
    the network itself otherwise); estimators with the same reference share one
    Monte-Carlo estimate per σ (the same random numbers for every reference, ``seed``).

    ``wrt='weights'`` smooths the binary weights (``layer=None``: all latent kernels, one
    row per kernel; ``layer='fc1'``: that kernel only; ``max_channels``: only that many
    random output channels of each, see ``make_loss``). ``wrt='activations'`` smooths the
    pre-activations entering module ``layer`` over the batch, using the per-example
    separable estimator. ``num_samples`` may be a list: the largest is drawn once and the
    smaller counts use the first groups of it (each rounded to whole groups, >= 3).

    Returns rows (dicts) with ``estimator, reference, wrt, layer, sigma, num_samples,
    cosine, ci_low, ci_high`` (the raw cosine and its 95% jackknife CI) and
    ``cosine_corrected, corrected_ci_low, corrected_ci_high`` (see ``group_similarities``).
    """
    if isinstance(batch, Mapping):
        x, labels = batch["image"], batch["label"]
    else:
        x, labels = batch
    counts = sorted({int(num_samples)} if np.ndim(num_samples) == 0 else {int(n) for n in num_samples})
    if num_groups < 3:
        raise ValueError(f"num_groups must be >= 3 (jackknife of the corrected cosine); got {num_groups}.")
    separable = wrt == "activations"
    groups: dict[str, tuple[dict, list[str]]] = {}
    for label, overrides in estimators.items():
        merged = {**dict(model_overrides), **dict(overrides)}
        ref = dict(references[label]) if references and label in references else deployed_forward(merged, model_name)
        groups.setdefault(_canonical(ref), (ref, []))[1].append(label)

    rows = []
    base_key = jax.random.key(seed)
    for ref, labels_in_group in groups.values():
        ref_model = models.create(model_name, **{**dict(model_overrides), **ref})
        common = dict(wrt=wrt, layer=layer, progress=progress, loss=loss, max_channels=max_channels, seed=seed)
        loss_fn, point = make_loss(ref_model, variables, x, labels, per_example=separable, **common)
        grads = {}
        for label in labels_in_group:
            est_model = models.create(model_name, **{**dict(model_overrides), **dict(estimators[label])})
            grads[label] = _named_leaves(estimator_grad(est_model, variables, x, labels, **common), wrt, layer)
        for si, sigma in enumerate(sigmas):
            sm = smoothed_grad(loss_fn, point, jax.random.fold_in(base_key, si), sigma, num_samples=counts[-1],
                               chunk_size=chunk_size, num_groups=num_groups, separable=separable)
            per_group = sm.num_samples // num_groups
            group_leaves = _named_leaves(sm.group_grads, wrt, layer)
            for n in counts:
                k = min(num_groups, max(3, round(n / per_group)))
                for label in labels_in_group:
                    for name, est in grads[label].items():
                        raw, corr = group_similarities(est, group_leaves[name][:k])
                        rows.append(dict(
                            estimator=label, reference=_describe(ref), wrt=wrt, layer=name,
                            sigma=float(sigma), num_samples=k * per_group,
                            cosine=raw.value, ci_low=raw.low, ci_high=raw.high,
                            cosine_corrected=corr.value, corrected_ci_low=corr.low, corrected_ci_high=corr.high,
                        ))
    return rows


def _named_leaves(tree, wrt: str, layer: str | None) -> dict[str, jax.Array]:
    if wrt == "activations":
        return {f"{layer} (input)": tree}
    return dict(tree)


def _describe(overrides: Mapping[str, Any]) -> str:
    name = overrides.get("input_quantizer", "?")
    kwargs = dict(overrides.get("input_quantizer_kwargs") or {})
    return name + (f"({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})" if kwargs else "")
