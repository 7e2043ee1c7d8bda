"""Quantized layers in inference form: what the exporter stores for each layer.

Each layer's input quantizer becomes an activation code (:mod:`binax.export.codes`: the
levels ``low + j·Δ`` as P binary planes), read from the deployed quantizer's descriptor;
what the layer is (its quantizers, product, geometry and packed form) is read from its
layer descriptor (:func:`binax.layers.describe`). The runtime side of an exported layer
is :mod:`binax.export.packed_layer`.

A kernel quantizer is exported by evaluating it on the latent weights and splitting the
result into ``sign`` bits and ``α = |q|`` per output channel (``xnor_weight``: mean|W|;
``libra_pb``: a power of two; ``duo_weight``: one α for the layer; sign-like: 1). A
quantizer whose values are not ``±α`` per channel (ternary, DoReFa, user callables) is
kept as its float quantized kernel, and the layer computes in float.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from binax import binarizers, layers
from binax.export.codes import ActivationCode, activation_code
from binax.export.packed_layer import PackedLayer, derived_arrays
from binax.packed.bits import pack_bits_np

__all__ = [
    "ActivationCode",
    "activation_code",
    "quantized_kernel",
    "quantize_kernels",
    "kernel_request",
    "decompose_kernel",
    "LayerExport",
    "exported",
    "export_layer",
    "PackedLayer",
    "derived_arrays",
]


def exported(module: nn.Module) -> bool:
    """Whether the exporter replaces this layer (its descriptor declares a packed form)."""
    return layers.describe(module).export is not None


# ----------------------------------------------------------------- kernels


def quantized_kernel(spec, kwargs, latent, progress: float = 1.0) -> np.ndarray:
    """The kernel one layer multiplies by at inference, ``q(W)``, as float32 NumPy.

    Sign-like quantizers (and ``tanh_sign``) give ``sign(W)``; others are evaluated under
    ``jit`` as in the model (:func:`quantize_kernels` does a whole model in one call).
    """
    return quantize_kernels({(): (spec, kwargs, latent)}, progress)[()]


def quantize_kernels(kernels: Mapping[Any, tuple], progress: float = 1.0) -> dict[Any, Any]:
    """``{key: q(W)}`` for ``{key: (spec, kwargs, latent)}``, every quantizer in ONE jit.

    ``spec`` may be any function ``fn(w, **kwargs)`` a layer's descriptor names
    (:attr:`binax.layers.LayerDescriptor.kernel_function`: ABC-Net's
    :func:`binax.binarizers.abc_weight_bases` gives ``(bases, alphas)``).
    """
    out, todo = {}, {}
    for key, (spec, kwargs, latent) in kernels.items():
        spec, kwargs = binarizers.deployed(spec, kwargs)
        latent = np.asarray(latent, np.float32)
        if binarizers.describe(spec).is_sign:
            out[key] = np.where(latent >= 0, 1.0, -1.0).astype(np.float32)
        else:
            todo[key] = (spec, kwargs, latent)
    if not todo:
        return out
    keys = list(todo)

    def run(latents):
        res = []
        for key, w in zip(keys, latents):
            spec, kwargs, _ = todo[key]
            res.append(binarizers.resolve(spec, **kwargs)(w, progress))
        return res

    results = jax.jit(run)([todo[k][2] for k in keys])
    for key, r in zip(keys, results):
        out[key] = jax.tree.map(lambda a: np.asarray(a, np.float32), r)
    return out


def kernel_request(module: nn.Module, params: Mapping[str, Any]) -> tuple | None:
    """``(spec, kwargs, latent)`` for :func:`quantize_kernels`, or None (no quantized kernel):
    read from the layer's descriptor (:meth:`binax.layers.LayerDescriptor.kernel_request`)."""
    return layers.describe(module).kernel_request(module, params)


def decompose_kernel(q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``q = α·b`` with ``b = sign(q)`` (0 -> +1) and ``α = max|q|`` per output channel (last axis).

    Returns ``(b >= 0 as bools, α)``, or None when some ``|q|`` differs from its channel's
    ``α`` (not a scaled binary kernel) or is not finite.
    """
    q = np.asarray(q, np.float32)
    if q.ndim < 2 or not np.all(np.isfinite(q)):
        return None
    alpha = np.max(np.abs(q), axis=tuple(range(q.ndim - 1)))
    if not np.array_equal(np.abs(q), np.broadcast_to(alpha, q.shape)):
        return None
    return q >= 0, alpha.astype(np.float32)


# ----------------------------------------------------------------- one layer


@dataclasses.dataclass
class LayerExport:
    """A quantized layer in inference form.

    ``kind``:

    * ``"xnor"``: ±1 planes of the input × packed ±1 kernel by XOR-popcount, int32
      accumulator × per-channel float (``arrays``: ``bits``, ``alpha``, [``bias``]);
    * ``"abc"``: ABC-Net, N shifted sign planes × M packed bases by XOR-popcount,
      ``Σ α_m β_n acc_mn`` (``bits``, ``alphas``, ``shifts``, ``betas``, [``bias``]);
    * ``"float_input"``: packed ±1 kernel (stored packed), float input: the kernel is
      unpacked to ``α·b`` and the layer runs as a float layer;
    * ``"float"``: the quantized kernel stored as float32 (``kernel``), float compute.

    ``info`` holds the static facts (JSON): shapes, packing axis, code, layout; ``note``
    says why a layer is not on the popcount path.
    """

    kind: str
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    note: str = ""


def export_layer(
    module: nn.Module,
    params: Mapping[str, Any],
    *,
    progress: float = 1.0,
    map_shape: Sequence[int] | None = None,
    quantized: Any = None,
) -> LayerExport | None:
    """Inference form of one quantized layer (None for a layer that quantizes nothing).

    ``module`` is the layer as the model builds it (from the inference config, so
    ``tanh_sign`` is already ``sign``); ``params`` its parameters. ``map_shape = (H, W, C)``
    asks for a dense layer fed by a flattened ``H×W×C`` map to store its kernel as an
    ``H×W`` convolution packed along ``C`` (the packed chain keeps such maps packed per
    pixel). ``quantized``: the layer's entry of :func:`quantize_kernels`, when the
    caller evaluated every layer's quantizer at once.

    What the layer is (its quantizers, product, geometry, packed form) is read from its
    descriptor (:func:`binax.layers.describe`).
    """
    desc = layers.describe(module)
    if quantized is None and desc.kernel_request(module, params) is not None:
        quantized = quantize_kernels({(): desc.kernel_request(module, params)}, progress)[()]
    if desc.export == "abc":
        return _export_abc(desc, module, params, map_shape, quantized)
    if desc.export != "binary":
        return None
    in_spec = desc.input_quantizer(module)[0]
    k_spec = desc.kernel_quantizer(module)[0]
    if in_spec is None and k_spec is None:
        return None
    in_q, in_kw = desc.deployed_input(module)
    code = activation_code(in_q, in_kw)
    bias = params.get("bias")
    extra = {} if bias is None else {"bias": np.asarray(bias, np.float32)}
    info: dict[str, Any] = {
        "input_quantizer": in_q if isinstance(in_q, (str, type(None))) else repr(in_q),
        "kernel_quantizer": binarizers.deployed(k_spec)[0],
    }
    if k_spec is None:
        kernel = np.asarray(params["kernel"], np.float32)
        info.update(shape=list(kernel.shape))
        return LayerExport("float", {"kernel": kernel, **extra}, info, "float kernel (only the input is quantized)")

    q = quantized
    info.update(shape=list(q.shape))
    split = decompose_kernel(q)
    if split is None:
        return LayerExport(
            "float", {"kernel": q, **extra}, info, f"kernel quantizer {info['kernel_quantizer']!r} is not ±α per channel"
        )
    bits, alpha = split
    depthwise = desc.product == "depthwise_conv"
    conv = desc.product == "conv"
    reason = None
    if code is None:
        reason = "float input" if in_spec is None else f"no packed code for input quantizer {in_q!r}"
    elif depthwise:
        reason = "depthwise convolution (one input channel per output: nothing to pack along)"
    elif conv:
        g = desc.geometry(module)
        reason = g.not_packable()
        if reason is None and code.pad_planes(g.pad_value) is None:
            reason = f"pad value {g.pad_value} is not a level of {in_q!r}"
    if reason is not None:
        axis = q.ndim - 1 if depthwise else q.ndim - 2
        info.update(pack_axis=axis)
        return LayerExport("float_input", {"bits": pack_bits_np(bits, axis), "alpha": alpha, **extra}, info, reason)

    if not conv and map_shape is not None:
        h, w, c = map_shape
        bits = bits.reshape(h, w, c, bits.shape[-1])
        info.update(layout="map", map_shape=[int(h), int(w), int(c)])
    else:
        info.update(layout="conv" if conv else "dense")
    axis = bits.ndim - 2
    packed = pack_bits_np(bits, axis)
    n_in = int(math.prod(bits.shape[:-1]))
    info.update(
        pack_axis=axis,
        in_channels=int(bits.shape[axis]),
        code=code.to_json(),
        column_sums_n=n_in,
    )
    if conv:
        info.update(pad_planes=list(code.pad_planes(desc.geometry(module).pad_value)))
    return LayerExport("xnor", {"bits": packed, "alpha": alpha, **extra}, info)


def _export_abc(desc: layers.LayerDescriptor, module, params, map_shape, quantized) -> LayerExport:
    latent = np.asarray(params["latent_kernel"], np.float32)
    bases, alphas = quantized
    bias = params.get("bias")
    extra = {} if bias is None else {"bias": np.asarray(bias, np.float32)}
    extra.update(
        shifts=np.asarray(params["shifts"], np.float32),
        betas=np.asarray(params["betas"], np.float32),
        alphas=alphas,
    )
    m, n = desc.bases(module)
    info: dict[str, Any] = {"shape": list(latent.shape), "m": m, "n": n}
    conv = desc.product == "conv"
    g = desc.geometry(module) if conv else None
    reason = g.not_packable() if conv else None
    if reason is None and conv and g.pad_value not in (-1.0, 0.0, 1.0):
        reason = f"pad value {g.pad_value} (each binary activation must pad with -1, 0 or +1)"
    if reason is not None:
        axis = latent.ndim - 1
        info.update(pack_axis=axis)
        packed = np.stack([pack_bits_np(b >= 0, axis) for b in bases])
        return LayerExport("float_input", {"bits": packed, **extra}, info, reason)
    b = bases >= 0  # (M, ..., C, O)
    if not conv and map_shape is not None:
        h, w, c = map_shape
        b = b.reshape(b.shape[0], h, w, c, b.shape[-1])
        info.update(layout="map", map_shape=[int(h), int(w), int(c)])
    else:
        info.update(layout="conv" if conv else "dense")
    # Bases side by side on the output axis: one popcount pass gives every (m, o).
    b = np.moveaxis(b, 0, -2)
    b = b.reshape(*b.shape[:-2], -1)
    axis = b.ndim - 2
    info.update(pack_axis=axis, in_channels=int(b.shape[axis]))
    return LayerExport("abc", {"bits": pack_bits_np(b, axis), **extra}, info)
