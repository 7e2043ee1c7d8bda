"""binax.packed.geometry: the one padding/window helper of layers, training fast path and
packed kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from binax.packed import geometry


@pytest.mark.parametrize("size,k,s,d", [(7, 3, 1, 1), (8, 3, 2, 1), (9, 3, 1, 2), (5, 4, 3, 1)])
def test_same_and_valid_are_what_lax_computes(size, k, s, d):
    x = jnp.ones((1, size, size, 1))
    w = jnp.ones((k, k, 1, 1))
    for mode in ("SAME", "VALID"):
        pads = geometry.padding_pairs(mode.lower(), (size, size), (k, k), (s, s), (d, d))
        want = lax.conv_general_dilated(x, w, (s, s), mode, rhs_dilation=(d, d), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        got = geometry.conv(x, w, (s, s), pads, (d, d))
        np.testing.assert_array_equal(got, want)
        assert got.shape[1:3] == geometry.output_size((size, size), (k, k), (s, s), pads, (d, d))


def test_ints_pairs_and_errors():
    assert geometry.padding_pairs(2, (5, 5), (3, 3), (1, 1)) == ((2, 2), (2, 2))
    assert geometry.padding_pairs([1, (0, 2)], (5, 5), (3, 3), (1, 1)) == ((1, 1), (0, 2))
    assert geometry.padding_pairs(-1, (5, 5), (3, 3), (1, 1)) == ((-1, -1), (-1, -1))
    with pytest.raises(ValueError, match="non-negative"):
        geometry.padding_pairs(-1, (5, 5), (3, 3), (1, 1), nonnegative=True)
    with pytest.raises(ValueError, match="padding must be"):
        geometry.padding_pairs("FULL", (5, 5), (3, 3), (1, 1))
    with pytest.raises(ValueError, match="padding must be"):
        geometry.padding_pairs([(1, 1)], (5, 5), (3, 3), (1, 1))  # one pair for two axes
    assert geometry.ntuple(2, 3, "strides") == (2, 2, 2)
    with pytest.raises(ValueError, match="strides must be an int or a sequence of 2 ints >= 1"):
        geometry.ntuple((1, 0), 2, "strides")
    with pytest.raises(ValueError, match="does not fit"):
        geometry.output_size((2, 2), (3, 3), (1, 1), ((0, 0), (0, 0)))


def test_padded_conv_pads_with_the_value_before_a_valid_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 2, 3, 4))
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 1), (0, 0)), constant_values=1.0)  # SAME for (3, 2) at stride 1
    want = lax.conv_general_dilated(xp, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(geometry.padded_conv(x, w, (1, 1), "SAME", pad_value=1.0), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        geometry.padded_conv(x, w, (1, 1), -1, pad_value=1.0)
