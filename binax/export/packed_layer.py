"""An exported layer at run time: encode the input into packed planes, accumulate by
XOR-popcount, decode to float; or run the layer's float form (:mod:`binax.export.inference`
says what the file stores).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from binax import layers
from binax.export.codes import ActivationCode
from binax.packed import geometry
from binax.packed.bits import column_sums, pack_bits, unpack_bits
from binax.packed.kernels import packed_conv, packed_dense

Array = jax.Array

__all__ = ["PackedLayer", "derived_arrays"]


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


def derived_arrays(export) -> dict[str, np.ndarray]:
    """Arrays computed at load from the stored ones (not saved): decode scales, ``S_b``
    (``export``: a :class:`binax.export.inference.LayerExport`)."""
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
