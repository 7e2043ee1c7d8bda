"""The packed model file and packed inference for every binax model.

``export(model, variables, preprocessing=...)`` turns a trained Flax module and its
``{params, batch_stats}`` into a :class:`PackedModel`:

* every quantized layer's kernel is evaluated by its quantizer and stored as sign bits,
  32 per ``uint32`` word along the reduction axis, with its scale (XNOR ``α``, Libra-PB's
  power of two, BinaryDuo's per-layer mean, ABC-Net's ``α_m`` and ``β_n``/shifts); the
  latent float weights are not stored;
* everything else (full-precision first/last layers, BatchNorms that feed float
  computations, shortcuts, RPReLU ...) keeps its float32 variables as they are;
* the input preprocessing of the training pipeline (:class:`Preprocessing`: raw ``uint8``
  → ``x / 255`` → mean/std, ``[0, 1]`` or ``[−1, 1]``) is recorded and applied:
  ``model(images)`` takes raw integer images, ``model.forward(inputs)`` inputs already
  preprocessed, and anything else is an error, never a silently wrong answer.

Two runtimes, chosen per model (``runtime="auto"``):

* ``"chain"`` (``bnn_mlp``, ``cnn_small``, ``vgg_small``, ``vgg7_tiny``, ``alexnet``:
  :mod:`binax.export.chain`): binary layers hand packed bits to each other through
  integer thresholds that replace ``[max-pool →] BatchNorm → activation → quantizer``,
  so there is no float activation between two binary layers; those BatchNorms are stored
  only as thresholds.
* ``"generic"`` (every model, e.g. ResNets with float shortcuts, ReActNet's RPReLU): the
  model's own Flax module runs under ``flax.linen.intercept_methods``, and each quantized
  layer's ``__call__`` is replaced by its packed computation (quantize the input into
  bit planes → pack → XOR-popcount against the packed kernel → int32 → × scale
  (+ bias)); float parts run as in training.

Both are exact for binary layers (integer accumulators) and reproduce the training
graph's eval-mode logits (``model.apply(variables, x, train=False, progress=1.0)``) up to
float rounding (bit for bit where the layer scales are powers of two). ``report()`` says,
layer by layer, what runs packed and what runs in float, and why.

The file is ONE ``.npz`` (format in docs/export.md): arrays under ``variables/…``,
``layers/…``, ``thresholds/…`` and ``preprocessing/table`` plus a JSON ``meta`` entry
(format name and version, the model's registry name and config, its quantizers' declared
forwards, preprocessing, input shape, layer order, the chain's steps, per-layer facts).
:func:`load` rebuilds the module from ``binax.models``' registry (never importing anything
the file names; :mod:`binax.export.packed_file`), needs neither ``binax.train`` nor latent
weights;
:meth:`PackedModel.save_portable` writes the same inference as a serialized
``jax.export`` (StableHLO) that runs with ``jax`` alone.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import numpy as np
from flax.core import unfreeze

import binax
from binax.errors import ConfigError, PackedFileError
from binax.export import chain as chain_lib
from binax.export import file_arrays, packed_file
from binax.export.identity import _build_module, _jsonable, module_identity
from binax.export.inference import (
    LayerExport,
    PackedLayer,
    derived_arrays,
    export_layer,
    exported,
    kernel_request,
    quantize_kernels,
)
from binax.export.preprocessing import Preprocessing, as_preprocessing
from binax.export.chain import subtree
from binax.export.runtime import PackedModel, trace
from binax.transforms import inference_model

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PORTABLE_REQUIREMENTS",
    "RUNTIMES",
    "PackedModel",
    "export",
    "load",
    "save",
    "read_meta",
]

FORMAT = packed_file.FORMAT
FORMAT_VERSION = packed_file.FORMAT_VERSION
RUNTIMES = ("auto", "chain", "generic")
#: What running a :meth:`PackedModel.save_portable` artifact needs: jax and the packages
#: jax itself requires, and flatbuffers, which ``jax.export.deserialize`` imports but jax
#: does not install (tests/test_export_file.py runs an artifact with exactly these).
PORTABLE_REQUIREMENTS = ("jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum", "scipy", "flatbuffers")


def _check_variables(variables: Mapping, abstract: Mapping) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ConfigError(f"variables must be a dict with 'params' (and 'batch_stats'); got {type(variables).__name__}.")
    want = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(unfreeze(abstract)).items()}
    have = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(unfreeze(dict(variables))).items()}
    missing = sorted("/".join(p) for p in set(want) - set(have))
    if missing:
        raise ConfigError(f"variables lack {len(missing)} entries the model needs, e.g. {missing[:3]}.")
    wrong = sorted("/".join(p) + f" {have[p]} != {want[p]}" for p in want if have[p] != want[p])
    if wrong:
        raise ConfigError(f"variables have the wrong shape for this model and input shape: {wrong[:3]}.")



def _chain_json(ops, exports: Mapping[tuple, LayerExport], plan: chain_lib.ChainPlan, calls) -> list[dict]:
    """The chain's steps in execution order, as the file records them (docs/export.md)."""
    out = []
    for op in ops:
        step: dict[str, Any] = {"op": op.kind}
        if op.path:
            step["path"] = "/".join(op.path)
        if op.kind == "max_pool":
            step.update(window=list(op.window), strides=list(op.strides), padding=_jsonable(op.padding, "padding"))
        elif op.kind == "activation":
            step["activation"] = op.activation
        elif op.kind == "layer":
            e = exports.get(op.path)
            step.update(type=type(calls[op.path].module).__name__, compute=e.kind if e else "float")
        elif op.kind == "block":
            block = plan.blocks[op.path]
            step.update(fused=op.path in plan.fused, norm=type(block.norm).__name__)
            if isinstance(block.norm, nn.BatchNorm):
                act = "rprelu" if block.act_module is not None else block.activation
                step.update(epsilon=float(block.norm.epsilon), activation=act)
        out.append(step)
    return out


# ------------------------------------------------------------------------- export


def export(
    model: nn.Module,
    variables: Mapping[str, Any],
    *,
    preprocessing: Preprocessing | str | None,
    input_shape: Sequence[int] | None = None,
    runtime: str = "auto",
    progress: float = 1.0,
) -> PackedModel:
    """Packs a trained model for inference.

    Args:
      model: the Flax module as trained (``binax.models.create(...)``, or the model
        :func:`binax.train.restore_variables` returns for a workdir); its quantizers must
        be registry names (or ``"module:function"``).
      variables: ``{'params': ..., 'batch_stats': ...}`` of the trained model.
      preprocessing: what the training pipeline did to raw images, recorded in the file
        and applied by ``packed(images)``: a :class:`Preprocessing`
        (``Preprocessing.from_config(config)`` for a training config), a dataset name
        (``'fashion_mnist'``: binax.data's default ``'mean_std'`` normalization), or None
        for a model that takes float inputs as given (then ``input_shape`` is required).
      input_shape: one example's shape, e.g. ``(32, 32, 3)``; default: the preprocessing's.
      runtime: ``"auto"`` (the packed chain where the family has a planner, else generic),
        ``"chain"`` or ``"generic"``.
      progress: training progress at which weight quantizers are evaluated (their
        forward does not depend on it for binax's binarizers).

    Returns:
      a :class:`PackedModel`; ``.save(path)`` writes the file, ``.save_portable(path)``
      the ``jax.export`` artifact.

    Raises:
      binax.errors.ConfigError: not a module, unknown runtime, a shape or variables that do
        not fit the model, a config value that cannot be stored.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"export takes the Flax module (binax.models.create(name, **config), or the model "
            f"binax.train.restore_variables(workdir) returns); got {type(model).__name__} {model!r:.60}."
        )
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {RUNTIMES}; got {runtime!r}.")
    pre = as_preprocessing(preprocessing, input_shape)
    shape = pre.shape
    registry_name, class_name, config, quantizers = module_identity(model)
    model = inference_model(model)
    ops = chain_lib.plan_ops(model)
    if runtime == "chain" and ops is None:
        raise ConfigError(
            f"{registry_name or class_name} has no packed-chain plan (model.chain() is None: residual networks, "
            f"BinaryDuo's replicated channels); use runtime='generic'."
        )
    calls, abstract = trace(model, shape)
    variables = unfreeze(dict(variables)) if isinstance(variables, Mapping) else variables
    _check_variables(variables, abstract)

    use_chain = ops is not None and runtime != "generic"
    map_shapes = chain_lib.map_shapes(ops, calls, shape) if use_chain else {}

    exports: dict[tuple, LayerExport] = {}
    params = variables["params"]
    replaced = {p: c.module for p, c in calls.items() if exported(c.module)}
    requests = {p: kernel_request(m, subtree(params, p)) for p, m in replaced.items()}
    quantized = quantize_kernels({p: r for p, r in requests.items() if r is not None}, progress)
    for path, module in replaced.items():
        e = export_layer(
            module, subtree(params, path), progress=progress, map_shape=map_shapes.get(path), quantized=quantized.get(path)
        )
        if e is not None:
            exports[path] = e

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "binax_version": binax.__version__,
        "model": registry_name,
        "model_class": class_name,
        "config": config,
        "quantizers": quantizers,
        "input_shape": list(shape),
        "preprocessing": pre.to_json(),
        "runtime": "chain" if use_chain else "generic",
        "progress": float(progress),
        "layer_order": [{"path": "/".join(p), "type": type(c.module).__name__} for p, c in calls.items()],
        "layers": {"/".join(p): {"kind": e.kind, "info": e.info, "note": e.note} for p, e in exports.items()},
    }
    arrays: dict[str, np.ndarray] = {}
    if pre.takes_raw:
        arrays["preprocessing/table"] = pre.table(shape[-1])
    for path, e in exports.items():
        for name, arr in e.arrays.items():
            arrays["layers/" + "/".join(path + (name,))] = np.asarray(arr)

    skip: set[tuple] = set(exports)  # modules whose float variables are not stored
    if use_chain:
        packed_layers = {p: PackedLayer(p, calls[p].module, e.kind, e.info) for p, e in exports.items()}
        blocks = {op.path: chain_lib.make_block(model, op.path, calls) for op in ops if op.kind == "block"}
        plan = chain_lib.ChainPlan(ops, packed_layers, blocks, {}, {}, {})
        layer_arrays = {p: {**e.arrays, **derived_arrays(e)} for p, e in exports.items()}
        thresholds = chain_lib.compile_thresholds(plan, layer_arrays, variables)
        for path, th in thresholds.items():
            for name, arr in th.items():
                arrays["thresholds/" + "/".join(path + (name,))] = arr
            skip.add(path)
        # A layer whose accumulators only meet thresholds never decodes: its scale and
        # bias live in the thresholds.
        for fused in plan.fused.values():
            key = "/".join(fused["producer"])
            for name in ("alpha", "bias"):
                arrays.pop(f"layers/{key}/{name}", None)
            meta["layers"][key]["info"]["scale_in_thresholds"] = True
        meta["fused"] = {"/".join(p): v for p, v in plan.fused.items()}
        meta["not_fused"] = {"/".join(p): v for p, v in plan.not_fused.items()}
        meta["chain"] = _chain_json(ops, exports, plan, calls)

    # The model's variables (what its trace declares), as float32: the runtime computes
    # in float32 whatever the training dtype.
    for col, tree in unfreeze(abstract).items():
        for path in traverse_util.flatten_dict(tree):
            if any(path[: len(s)] == s for s in skip):
                continue
            leaf = subtree(variables.get(col, {}), path)
            arrays["variables/" + "/".join((col,) + path)] = np.asarray(leaf, np.float32)
    return PackedModel(meta, arrays, _traced=(model, calls))


# ------------------------------------------------------------------------- file


def save(model: PackedModel, path: str | os.PathLike) -> int:
    """Writes ``model`` as one ``.npz`` (deflate-compressed) at ``path`` exactly (no suffix
    added), atomically (its folder is created if missing); returns its size in bytes."""
    return packed_file.write(path, model.meta, model.arrays())


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata of a packed model file, checked for the format, its version and the
    fields loading reads (:class:`binax.errors.PackedFileError` otherwise)."""
    return packed_file.check_meta(packed_file.read(path)[0], path)


def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> PackedModel:
    """Reads a packed model file written by :func:`save` / :meth:`PackedModel.save`, as data.

    The model is rebuilt from ``binax.models``' registry by the name and config the file
    records, its quantizers from ``binax.binarizers``' registry by name; nothing the file
    names is imported or called (docs/export.md says what loading trusts). A model of a
    class of your own (recorded by class name only) is run on the module you pass as
    ``model``, which must have the file's config.

    Raises:
      binax.errors.PackedFileError: one line naming the file and what is wrong with it (not
        a zip, truncated or damaged, another format version, malformed metadata, a model
        or quantizer that is not registered, a missing array, a wrong dtype or shape,
        non-finite values).
    """
    meta, arrays = packed_file.read(path)
    meta = packed_file.check_meta(meta, path)
    try:
        Preprocessing.from_json(meta["preprocessing"])
    except (ConfigError, TypeError) as e:
        raise PackedFileError(f"{path}: its preprocessing record is not valid: {e}") from None
    if model is None:
        module = _build_module(meta, path)
    else:
        _, cls_name, config, _ = module_identity(model)
        if cls_name != meta["model_class"] or config != meta["config"]:
            diff = sorted(k for k in set(config) | set(meta["config"]) if config.get(k) != meta["config"].get(k))
            raise PackedFileError(
                f"{path}: the model passed ({cls_name}) is not the one exported ({meta['model_class']}); "
                f"config keys that differ: {diff[:5]}."
            )
        module = model
    module = inference_model(module)
    try:
        calls, abstract = trace(module, tuple(meta["input_shape"]))
    except ConfigError as e:
        raise PackedFileError(f"{path}: its model does not take input_shape {meta['input_shape']}: {e}") from None
    if meta["runtime"] == "chain" and chain_lib.plan_ops(module) is None:
        raise PackedFileError(f"{path}: runtime 'chain', but {meta['model'] or meta['model_class']} has no chain plan.")
    want = file_arrays.expected_arrays(meta, calls, unfreeze(abstract), path)
    file_arrays.check_arrays(arrays, want, path)
    return PackedModel(meta, arrays, _traced=(module, calls))

