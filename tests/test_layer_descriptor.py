"""A layer type of the user's own, described once (binax.layers.register), is counted by
binax.summary and exported packed and in float by binax.export with no edit to binax.

The toy layer below is deliberately unlike binax's: its own field names for its
quantizers, its own parameter layout. Everything binax knows of it is its descriptor.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

import binax
import binax.export as bx
from binax import binarizers, layers
from binax.errors import ConfigError


class ToyDense(nn.Module):
    """``q_a(x) @ q_w(W)``: an activation and a weight quantizer under names of its own."""

    units: int
    activation_q: str | None = "ste_sign"
    weight_q: str = "ste_sign"

    @nn.compact
    def __call__(self, x, progress=1.0):
        if self.activation_q is not None:
            x = binarizers.resolve(self.activation_q)(x, progress)
        w = self.param("latent_kernel", nn.initializers.normal(1.0), (x.shape[-1], self.units))
        return x @ binarizers.resolve(self.weight_q)(w, progress)


layers.register(
    ToyDense,
    layers.LayerDescriptor(
        product="dense",
        input_quantizer=lambda m: (m.activation_q, {}),
        kernel_quantizer=lambda m: (m.weight_q, {}),
        export="binary",
    ),
)


class ToyNet(nn.Module):
    """Three toy layers, one per export form: a float input (packed kernel, float compute),
    sign × sign (XOR-popcount), and a ternary kernel (stored as its float values)."""

    tern: str = "ste_tern"

    @nn.compact
    def __call__(self, x, train=False, progress=1.0):
        x = x.reshape(x.shape[0], -1)
        x = ToyDense(40, activation_q=None, name="first")(x, progress)
        x = ToyDense(24, name="binary")(x, progress)
        return ToyDense(10, weight_q=self.tern, name="ternary")(x, progress)


SHAPE = (4, 4, 2)


@pytest.fixture(scope="module")
def toy():
    model = ToyNet()
    x = jax.random.normal(jax.random.key(1), (16, *SHAPE))
    variables = model.init(jax.random.key(0), x[:1])
    ref = model.apply(variables, x)
    return model, variables, x, ref


def test_a_described_layer_is_counted_by_the_summary(toy):
    s = binax.summary(toy[0], SHAPE)
    first, binary, ternary = (s.layer(n) for n in ("first", "binary", "ternary"))
    # A float input: float MACs, whatever the weights' bits; the latent kernel at 1 bit.
    assert first.kind == "Dense (float)" and (first.input_bits, first.kernel_bits) == (32, 1)
    assert first.macs == 32 * 40 and first.binary_macs == 0 and first.params_by_bits == {1: 32 * 40}
    # Sign x sign: binary MACs on XNOR-popcount, one binary op each.
    assert binary.kind == "BinaryDense" and binary.binary_macs == binary.binary_ops == 40 * 24
    assert binary.mac_bits == 1 and binary.params_by_bits == {1: 40 * 24}
    # A ternary kernel (2 bits, no binary planes) and a sign input: 2-bit float MACs.
    assert ternary.kind == "Dense (float)" and ternary.kernel_bits == 2 and ternary.mac_bits == 2
    assert ternary.params_by_bits == {2: 24 * 10} and ternary.binary_ops == 0
    assert s.totals.binary_ops == 40 * 24 and s.totals.memory_bytes == (32 * 40 + 40 * 24 + 2 * 24 * 10) / 8


def test_a_described_layer_is_exported_packed_and_in_float(toy, tmp_path):
    model, variables, x, ref = toy
    packed = bx.export(model, variables, preprocessing=None, input_shape=SHAPE)
    kinds = {"/".join(p): layer.kind for p, layer in packed.layers.items()}
    assert kinds == {"first": "float_input", "binary": "xnor", "ternary": "float"}, packed.report()
    # The file stores sign bits, not latent weights, for the packed layers.
    arrays = packed.arrays()
    assert arrays["layers/binary/bits"].dtype == np.uint32 and "layers/first/bits" in arrays
    assert not any(k.endswith("latent_kernel") for k in arrays)
    np.testing.assert_allclose(packed.forward(x), ref, rtol=1e-5, atol=1e-4)
    report = packed.report()
    assert "BinaryDense" in report and "xor-popcount (sign: 1 plane)" in report
    # The file names the class as text; loading runs the module the caller passes.
    packed.save(tmp_path / "toy.npz")
    loaded = bx.load(tmp_path / "toy.npz", model=model)
    np.testing.assert_array_equal(loaded.forward(x), packed.forward(x))


def test_a_descriptor_must_say_what_an_exporter_needs():
    with pytest.raises(ConfigError, match="must declare its product"):
        layers.LayerDescriptor(export="binary")
    with pytest.raises(ConfigError, match="must declare its geometry"):
        layers.LayerDescriptor(product="conv", export="binary")
    with pytest.raises(ConfigError, match="product='matmul'"):
        layers.LayerDescriptor(product="matmul")
    with pytest.raises(ConfigError, match="flax.linen.Module class"):
        layers.register(object, layers.LayerDescriptor())
    with pytest.raises(ConfigError, match="already has a descriptor"):
        layers.register(ToyDense, layers.LayerDescriptor(product="dense"))
    assert layers.describe(ToyNet()).product is None  # a module registered by none: no MACs
