"""Quantized layers in inference form: activation codes, packed kernels, packed layer compute.

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
import jax.numpy as jnp
import numpy as np

from binax import binarizers, layers
from binax.packed import geometry
from binax.packed.bits import column_sums, pack_bits, pack_bits_np, unpack_bits
from binax.packed.kernels import packed_conv, packed_dense

Array = jax.Array

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


# ----------------------------------------------------------------- activation codes


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


# ----------------------------------------------------------------- packed compute


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """The static side of an exported layer at run time (arrays are passed separately)."""

    path: tuple[str, ...]
    module: nn.Module  # unbound clone of the model's layer
    kind: str
    info: Mapping[str, Any]

    @property
    def descriptor(self) -> layers.LayerDescriptor:
        return layers.describe(self.module)

    @property
    def code(self) -> ActivationCode | None:
        c = self.info.get("code")
        if c is None:
            return None
        return ActivationCode(c["quantizer"], tuple(sorted(c["kwargs"].items())), c["low"], c["step"], c["planes"])

    @property
    def packed(self) -> bool:
        """Computed by XOR-popcount (``xnor``/``abc``)."""
        return self.kind in ("xnor", "abc")

    @property
    def integer_output(self) -> bool:
        """One int32 accumulator per output, decoded by ``acc·scale (+ bias)``."""
        return self.kind == "xnor"

    def pad_planes(self) -> tuple[int, ...]:
        if self.kind == "abc":
            desc = self.descriptor
            pv = int(desc.geometry(self.module).pad_value) if desc.product == "conv" else 1
            return (pv,) * desc.bases(self.module)[1]
        return tuple(self.info.get("pad_planes", (1,) * self.code.planes))

    def n_planes(self) -> int:
        return self.descriptor.bases(self.module)[1] if self.kind == "abc" else self.code.planes

    # ---- input planes

    def encode(self, arrays: Mapping[str, Array], x: Array) -> Array:
        """``(P, *x.shape[:-1], ceil(C/32))`` packed input planes of a float input."""
        if self.kind == "abc":
            shifts = arrays["shifts"].astype(jnp.float32)
            shifted = x.astype(jnp.float32)[None] + shifts.reshape((-1,) + (1,) * x.ndim)
            bits = shifted >= 0.5  # H_v(x) = +1 ⟺ clip(x + v, 0, 1) >= 0.5 ⟺ x + v >= 0.5
        else:
            bits = self.code.plane_bits(x)
        return pack_bits(bits, axis=-1)

    # ---- accumulators

    def accumulate(self, arrays: Mapping[str, Array], planes: Array) -> Array:
        """Integer accumulators from packed planes ``(P, N, ..., Cw)``.

        ``xnor``: ``(N, ..., O)`` int32, ``Σ_p Σ_k s_pk·b_k + c0·S_b``; ``abc``: one
        accumulator per activation plane and weight base, ``(P, N, ..., M·O)``.
        """
        bits = arrays["bits"]
        c = self.info["in_channels"]
        layout = self.info["layout"]
        p = planes.shape[0]
        if layout == "dense":
            lead = planes.shape[1:-1]
            acc = packed_dense(planes.reshape(-1, planes.shape[-1]), bits, c)
            acc = acc.reshape(p, *lead, bits.shape[-1])
        else:
            if layout == "map":
                h, w, _ = self.info["map_shape"]
                if planes.ndim == 3:  # flattened (P, N, H·W·Cw) words -> per-pixel words
                    planes = planes.reshape(p, planes.shape[1], h, w, -1)
                strides, pads = (1, 1), ((0, 0), (0, 0))
            else:
                g = self.descriptor.geometry(self.module)
                strides = g.ntuple("strides")
                pads = geometry.padding_pairs(g.padding, planes.shape[2:4], bits.shape[:2], strides)
            acc = self._conv_planes(planes, bits, c, strides, pads)
            if layout == "map":
                acc = acc.reshape(p, acc.shape[1], -1)
        if self.kind == "abc":
            return acc
        acc = jnp.sum(acc, axis=0) if p > 1 else acc[0]
        offset = self.code.offset
        if offset:
            acc = acc + offset * arrays["column_sums"]
        return acc

    def _conv_planes(self, planes, bits, c, strides, pads) -> Array:
        # Planes that pad alike share one packed_conv call (stacked on the batch axis).
        pad_planes = self.pad_planes() if self.info["layout"] == "conv" else (1,) * planes.shape[0]
        groups: dict[int, list[int]] = {}
        for i, pv in enumerate(pad_planes):
            groups.setdefault(pv, []).append(i)
        out = [None] * planes.shape[0]
        n = planes.shape[1]
        for pv, idx in groups.items():
            xb = planes[jnp.asarray(idx)] if len(idx) < planes.shape[0] else planes
            y = packed_conv(xb.reshape(-1, *planes.shape[2:]), bits, c, strides, pads, float(pv))
            y = y.reshape(len(idx), n, *y.shape[1:])
            for j, i in enumerate(idx):
                out[i] = y[j]
        return jnp.stack(out)

    def decode_scale(self, arrays: Mapping[str, Array]) -> Array:
        """Per-channel float of one accumulator step: ``α·Δ/2``."""
        return arrays["scale"]

    def decode(self, arrays: Mapping[str, Array], acc: Array) -> Array:
        """Float output ``acc·(α·Δ/2) (+ bias)``, or for ABC ``Σ_mn α_m β_n acc_mn (+ bias)``."""
        if self.kind == "abc":
            m = self.descriptor.bases(self.module)[0]
            acc = acc.reshape(*acc.shape[:-1], m, -1).astype(jnp.float32)
            y = jnp.einsum("p...mo,p,m->...o", acc, arrays["betas"], arrays["alphas"], precision="highest")
        else:
            y = acc.astype(jnp.float32) * arrays["scale"]
        if "bias" in arrays:
            y = y + arrays["bias"]
        return y

    # ---- float layers

    def float_apply(self, arrays: Mapping[str, Array], x: Array, progress=1.0) -> Array:
        """A ``float``/``float_input`` layer: the layer's float form (its descriptor's
        :meth:`~binax.layers.LayerDescriptor.forward_with`) with its float kernel."""
        del progress  # deployed quantizers do not follow progress
        desc = self.descriptor
        if self.kind == "float":
            kernel = arrays["kernel"]
        elif desc.export == "abc":
            # Σ_m α_m B_m from the packed bases.
            axis = self.info["pack_axis"]
            n = self.info["shape"][axis]
            bases = unpack_bits(arrays["bits"], n, axis=axis + 1, dtype=jnp.float32)
            kernel = jnp.tensordot(arrays["alphas"], bases, axes=1)
        else:
            axis = self.info["pack_axis"]
            n = self.info["shape"][axis]
            kernel = unpack_bits(arrays["bits"], n, axis=axis, dtype=jnp.float32) * arrays["alpha"]
        return desc.forward_with(self.module, x, kernel, arrays)


def derived_arrays(export: LayerExport) -> dict[str, np.ndarray]:
    """Arrays computed at load from the stored ones (not saved): decode scales, ``S_b``."""
    out = {}
    if export.kind == "xnor":
        code = export.info["code"]
        half_step = np.float32(code["step"] / 2)
        if "alpha" in export.arrays:  # absent when the chain folded it into thresholds
            out["scale"] = (np.asarray(export.arrays["alpha"], np.float32) * half_step).astype(np.float32)
        c0 = ActivationCode(code["quantizer"], (), code["low"], code["step"], code["planes"]).offset
        if c0:
            out["column_sums"] = column_sums(export.arrays["bits"], export.info["column_sums_n"])
    return out


