"""Bit packing and XNOR-popcount kernels: exact against integer / float references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from binax.folding import scan_steps

from binax.packed import (
    METHODS,
    PAD_BIT,
    column_sums,
    pack_bits,
    pack_bits_np,
    packed_conv,
    packed_dense,
    packed_size_bytes,
    threshold_to_bits,
    unpack_bits,
)


def pm1(rng, shape):
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=shape)


def np_pack(x, axis=-1):
    """Reference packing via ``np.packbits`` (little-endian bit order, PAD_BIT padding)."""
    x = np.asarray(x)
    bits = np.moveaxis(x if x.dtype == bool else x >= 0, axis, -1)
    pad = -bits.shape[-1] % 32
    bits = np.concatenate([bits, np.full(bits.shape[:-1] + (pad,), bool(PAD_BIT))], axis=-1)
    by = np.packbits(bits, axis=-1, bitorder="little").astype(np.uint32)
    by = by.reshape(*by.shape[:-1], -1, 4)
    words = by[..., 0] | (by[..., 1] << 8) | (by[..., 2] << 16) | (by[..., 3] << 24)
    return np.moveaxis(words, -1, axis)


# One compilation per case (eager mode would compile every primitive separately); inputs
# are packed with the NumPy reference, which the packing tests tie to pack_bits.
dense = jax.jit(packed_dense, static_argnames=("k", "method", "group_words"))
conv = jax.jit(
    packed_conv, static_argnames=("in_channels", "strides", "padding", "pad_value", "method", "group_words")
)


def float_conv_pm1(x, w, strides, padding, pad_value):
    """Float conv of ±1 values whose padded pixels are ``pad_value`` (not 0)."""
    hw, win = x.shape[1:3], w.shape[:2]
    pads = lax.padtype_to_pads(hw, win, strides, padding) if isinstance(padding, str) else padding
    xp = np.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)), constant_values=pad_value)
    out = lax.conv_general_dilated(
        xp, w, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    return np.asarray(out).astype(np.int64)


# ---------------------------------------------------------------------------- packing


def test_pack_bits_order_is_lsb_first_with_bit_one_for_nonnegative():
    x = np.array([1.0, -1.0, 0.0, 1.0, -0.5])  # bits 1,0,1,1,0 -> 1 + 4 + 8
    np.testing.assert_array_equal(pack_bits(x), np.array([13], np.uint32))
    full = np.ones(32)
    np.testing.assert_array_equal(pack_bits(full), np.array([0xFFFFFFFF], np.uint32))


@pytest.mark.parametrize("shape,axis", [((3, 70), -1), ((33, 5), 0), ((2, 31, 4), 1), ((64,), 0), ((4, 1), 1)])
def test_pack_bits_matches_numpy_packbits(shape, axis):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x[tuple(0 for _ in shape)] = 0.0  # sign(0) = +1
    got = pack_bits(x, axis=axis)
    assert got.dtype == jnp.uint32
    np.testing.assert_array_equal(got, np_pack(x, axis))
    np.testing.assert_array_equal(pack_bits(x >= 0, axis=axis), got)  # bool input


@pytest.mark.parametrize("n", [1, 31, 32, 33, 95, 128])
def test_unpack_inverts_pack_for_any_length(n):
    x = pm1(np.random.default_rng(n), (3, n, 2))
    words = jax.jit(pack_bits, static_argnames="axis")(x, axis=1)
    assert words.shape == (3, -(-n // 32), 2)
    unpack = jax.jit(unpack_bits, static_argnames=("n", "axis", "dtype"))
    np.testing.assert_array_equal(unpack(words, n=n, axis=1), x >= 0)
    np.testing.assert_array_equal(unpack(words, n=n, axis=1, dtype=jnp.float32), x)
    # The padding positions hold PAD_BIT.
    padded = unpack(words, n=32 * words.shape[1], axis=1)
    assert np.all(np.asarray(padded)[:, n:, :] == bool(PAD_BIT))


@pytest.mark.parametrize("shape,axis", [((3, 70), 1), ((33, 5), 0), ((2, 3, 64, 4), 2), ((32, 7), 0), ((64, 7), 0), ((40, 7), 0)])
def test_pack_bits_np_is_pack_bits(shape, axis):
    """Export-time packing equals pack_bits, also when no padding is needed and the packed
    axis is not the last (a dense kernel (in, out) packs along axis 0)."""
    b = np.random.default_rng(1).random(shape) < 0.5
    np.testing.assert_array_equal(pack_bits_np(b, axis), np.asarray(pack_bits(jnp.asarray(b), axis=axis)))


def test_column_sums_count_plus_minus_one_per_output_channel():
    w = pm1(np.random.default_rng(2), (3, 3, 40, 5))  # 40 channels: 2 words, 24 padding bits
    packed = pack_bits_np(w >= 0, 2)
    np.testing.assert_array_equal(column_sums(packed, 3 * 3 * 40), w.reshape(-1, 5).sum(0).astype(np.int32))


def test_pack_and_unpack_are_jittable():
    x = pm1(np.random.default_rng(1), (4, 45))
    pack = jax.jit(pack_bits, static_argnames="axis")
    unpack = jax.jit(unpack_bits, static_argnames=("n", "axis", "dtype"))
    np.testing.assert_array_equal(unpack(pack(x, axis=1), n=45, axis=1, dtype=jnp.float32), x)


def test_packed_size_bytes():
    assert packed_size_bytes((4096, 4096), axis=0) == 4096 * 4096 // 8
    assert packed_size_bytes((3, 3, 128, 64), axis=2) * 32 == 4 * 3 * 3 * 128 * 64
    assert packed_size_bytes((33, 2), axis=0) == 2 * 2 * 4  # 33 bits need 2 words


def test_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="n=70 needs 3 words"):
        unpack_bits(pack_bits(np.ones(33)), 70)
    with pytest.raises(ValueError, match="uint32"):
        unpack_bits(np.ones(3, np.int32), 3)
    with pytest.raises(ValueError, match="axis=2"):
        pack_bits(np.ones((2, 2)), axis=2)


# ------------------------------------------------------------------------------ dense


@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 300])
@pytest.mark.parametrize("method", METHODS)
def test_packed_dense_equals_integer_dot_of_pm1(k, method):
    rng = np.random.default_rng(k)
    a, w = pm1(rng, (2, 3, k)), pm1(rng, (k, 37))
    got = dense(np_pack(a), np_pack(w, axis=0), k=k, method=method)
    assert got.dtype == jnp.int32 and got.shape == (2, 3, 37)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))


@pytest.mark.parametrize("group_words", [1, 3, 4])
def test_packed_dense_word_groups_change_nothing(group_words):
    rng = np.random.default_rng(7)
    a, w = pm1(rng, (5, 330)), pm1(rng, (330, 20))  # 11 words: groups of 3 and 4 need padding
    got = dense(np_pack(a), np_pack(w, axis=0), k=330, group_words=group_words)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))


def test_packed_dense_under_jit():
    rng = np.random.default_rng(3)
    a, w = pm1(rng, (4, 70)), pm1(rng, (70, 9))
    f = jax.jit(lambda a, w: packed_dense(pack_bits(a), pack_bits(w, axis=0), 70))
    np.testing.assert_array_equal(f(a, w), a.astype(np.int64) @ w.astype(np.int64))


def test_packed_dense_rejects_bad_arguments():
    a, w = pack_bits(np.ones((2, 40))), pack_bits(np.ones((40, 3)), axis=0)
    with pytest.raises(ValueError, match="k=70 needs 3 words"):
        packed_dense(a, w, 70)
    with pytest.raises(ValueError, match="Unknown method 'xnor'"):
        packed_dense(a, w, 40, method="xnor")
    with pytest.raises(ValueError, match="uint32"):
        packed_dense(np.ones((2, 2), np.int32), w, 40)


# ------------------------------------------------------------------------------- conv

CONV_CASES = list(
    itertools.product([5, 40], [1, 2], ["SAME", "VALID", ((2, 0), (1, 3))], [1.0, -1.0, 0.0])
)


@pytest.mark.parametrize("channels,stride,padding,pad_value", CONV_CASES)
def test_packed_conv_equals_float_conv_with_pad_values(channels, stride, padding, pad_value):
    rng = np.random.default_rng(channels + stride)
    x, w = pm1(rng, (2, 7, 6, channels)), pm1(rng, (3, 3, channels, 6))
    got = conv(np_pack(x), np_pack(w, axis=2), channels, stride, padding, pad_value)
    want = float_conv_pm1(x, w, (stride, stride), padding, pad_value)
    assert got.dtype == jnp.int32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_packed_conv_methods_agree(method):
    rng = np.random.default_rng(11)
    x, w = pm1(rng, (2, 6, 6, 33)), pm1(rng, (3, 2, 33, 4))
    got = jax.jit(lambda x, w: packed_conv(x, w, 33, (2, 1), "SAME", 1.0, method=method))(
        pack_bits(x), pack_bits(w, axis=2)
    )
    np.testing.assert_array_equal(got, float_conv_pm1(x, w, (2, 1), "SAME", 1.0))


def test_packed_conv_rejects_bad_arguments():
    x, w = pack_bits(np.ones((1, 4, 4, 8))), pack_bits(np.ones((3, 3, 8, 2)), axis=2)
    with pytest.raises(ValueError, match="pad_value must be -1, 0 or \\+1"):
        packed_conv(x, w, 8, pad_value=0.5)
    with pytest.raises(ValueError, match="padding must be"):
        packed_conv(x, w, 8, padding="FULL")
    with pytest.raises(ValueError, match="in_channels=40 needs 2 words"):
        packed_conv(x, w, 40)


# ------------------------------------------------------------------- binary activations


def _fold(fn, bound):
    """Integer thresholds of ``fn`` on every accumulator value in [-bound, bound] (binax's one
    folding routine, as the packed chain uses it)."""
    steps = scan_steps(fn(np.arange(-bound, bound + 1)[:, None]), -bound)
    assert steps.monotone.all()
    return steps.thresholds(-(2**30)).astype(np.int32), steps.flips


def test_threshold_to_bits_is_sign_of_batchnorm():
    rng = np.random.default_rng(5)
    c = 40
    acc = rng.integers(-60, 61, size=(6, c)).astype(np.int32)
    mean, var = rng.normal(0, 10, c), rng.uniform(0.5, 4.0, c)
    gamma, beta = rng.normal(0, 1, c), rng.normal(0, 1, c)
    gamma[:3] = 0.0  # constant sign(beta)
    beta[0] = 0.0  # sign(0) = +1
    scale = rng.uniform(0.2, 2.0, c)  # XNOR alpha per output channel
    scale[5] = 0.0

    def bn_sign(a):  # sign(BN(scale * a)) = +1, in float64
        return gamma * (scale * a.astype(np.float64) - mean) / np.sqrt(var + 1e-3) + beta >= 0

    t, flip = _fold(bn_sign, 60)
    got = jax.jit(threshold_to_bits)(acc, t, flip)
    assert got.shape == (6, 2)
    np.testing.assert_array_equal(unpack_bits(got, c), bn_sign(acc))
    np.testing.assert_array_equal(got, np_pack(bn_sign(acc)))


def test_threshold_to_bits_compares_real_thresholds_exactly():
    acc = np.arange(-4, 5, dtype=np.int32)[:, None]
    tau = np.array([0.0, 0.5, -1.5, np.inf, -np.inf], np.float32)
    got = unpack_bits(jax.jit(threshold_to_bits)(acc, tau), 5)
    np.testing.assert_array_equal(got, acc >= tau)


def test_two_binary_layers_without_float_activations():
    """dense → BN → sign → dense, packed end to end, equals the float computation."""
    rng = np.random.default_rng(9)
    x, w1, w2 = pm1(rng, (8, 70)), pm1(rng, (70, 45)), pm1(rng, (45, 10))
    alpha = np.abs(rng.normal(size=45)) + 0.1
    mean, var = rng.normal(0, 3, 45), rng.uniform(0.5, 2, 45)
    gamma, beta = rng.normal(size=45), rng.normal(size=45)
    h = alpha * (x.astype(np.float64) @ w1)
    h = np.where(gamma * (h - mean) / np.sqrt(var + 1e-5) + beta >= 0, 1, -1)
    want = h @ w2

    t, flip = _fold(lambda a: gamma * (alpha * a - mean) / np.sqrt(var + 1e-5) + beta >= 0, 70)

    @jax.jit
    def packed_net(xp, w1p, w2p):
        hp = threshold_to_bits(packed_dense(xp, w1p, 70), t, flip)
        return packed_dense(hp, w2p, 45)

    got = packed_net(pack_bits(x), pack_bits(w1, axis=0), pack_bits(w2, axis=0))
    np.testing.assert_array_equal(got, want)
