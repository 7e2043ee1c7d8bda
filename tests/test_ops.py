"""binax.ops: the XNOR fast path equals the plain XLA formulation, forward and backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binax import ops
from binax.ops import binary as ops_binary


def _pm1(key, shape, dtype=jnp.float32):
    """Random ±1 with exact zeros mapped to +1 (the binarizers' sign(0) = +1)."""
    return jnp.where(jax.random.normal(key, shape) >= 0, 1.0, -1.0).astype(dtype)


def _scaled_kernel(key, shape, scales):
    """``α_o · sign(w)`` per output channel (the contract of the fast path)."""
    return _pm1(key, shape) * jnp.asarray(scales, jnp.float32)


def _value_and_grads(fn, x, kernel, cotangent):
    y, vjp = jax.vjp(fn, x, kernel)
    return (y, *vjp(cotangent))


@jax.jit
def _both(x, kernel, cotangent, op):
    """(xnor, xla) values and gradients of ``op(x, kernel, impl)`` in one compilation."""
    return tuple(
        _value_and_grads(lambda a, b, impl=impl: op(a, b, impl), x, kernel, cotangent) for impl in ("xnor", "xla")
    )


def _assert_grads_close(got, want):
    """Float32 tolerance relative to each gradient's magnitude (sums in another order)."""
    for g, w in zip(got, want):
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-6 * scale)


SLOW = pytest.mark.slow  # the fast tier (-m "not slow") keeps one case of each test
CONV_CASES = [
    # (H, W, C, O, window, strides, padding, pad_value)
    pytest.param(7, 7, 40, 6, (3, 3), 1, "SAME", 1.0, marks=SLOW),
    (7, 7, 40, 6, (3, 3), 1, "SAME", -1.0),
    pytest.param(8, 7, 5, 3, (3, 3), 2, "SAME", 1.0, marks=SLOW),  # odd/even sizes: asymmetric SAME padding
    pytest.param(8, 9, 33, 4, (3, 3), 2, "VALID", 1.0, marks=SLOW),  # the last row/column is never read
    pytest.param(6, 5, 7, 5, (2, 3), (1, 2), ((1, 0), (2, 1)), -1.0, marks=SLOW),
    pytest.param(5, 5, 9, 4, (3, 3), 1, "SAME", 0.0, marks=SLOW),  # zero padding: a per-position correction
]


@pytest.mark.parametrize("h,w,c,o,window,strides,padding,pad_value", CONV_CASES)
def test_conv_xnor_matches_xla(h, w, c, o, window, strides, padding, pad_value):
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = _pm1(kx, (2, h, w, c))
    # Power-of-two scales (Libra-PB style) keep every partial sum exact: outputs are equal.
    kernel = _scaled_kernel(kk, (*window, c, o), [2.0 ** (i % 3 - 1) for i in range(o)])

    op = jax.tree_util.Partial(
        lambda a, b, impl: ops.binary_conv2d(a, b, strides, padding, pad_value, impl=impl)
    )
    out_shape = jax.eval_shape(lambda a, b: op(a, b, "xla"), x, kernel).shape
    got, want = _both(x, kernel, jax.random.normal(kg, out_shape), op)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert got[1].shape == x.shape and got[2].shape == kernel.shape
    _assert_grads_close(got[1:], want[1:])


@pytest.mark.slow
@pytest.mark.parametrize("n", [6, 5])
def test_conv_weight_gradient_summed_over_chunks_of_images(n, monkeypatch):
    # The weight gradient is accumulated over chunks of whole images (cache-sized); a
    # small chunk makes 3 chunks of 2 images (n=6) and 5 chunks of 1 (n=5, prime).
    per_image = 7 * 7 * 9 * 40  # output positions x taps x input channels
    monkeypatch.setattr(ops_binary, "_CHUNK_FLOATS", 2 * per_image)
    assert ops_binary._images_per_chunk(n, per_image) == {6: 2, 5: 1}[n]
    kx, kk, kg = jax.random.split(jax.random.key(1), 3)
    x, kernel = _pm1(kx, (n, 7, 7, 40)), _scaled_kernel(kk, (3, 3, 40, 6), [1.0] * 6)
    g = jax.random.normal(kg, (n, 7, 7, 6))
    grads = {
        impl: jax.vjp(lambda a, b, impl=impl: ops.binary_conv2d(a, b, 1, "SAME", 1.0, impl=impl), x, kernel)[1](g)
        for impl in ("xnor", "xla")
    }
    _assert_grads_close(grads["xnor"], grads["xla"])


def test_conv_xla_impl_is_the_padded_convolution():
    """The reference itself: pad the ±1 input with pad_value, then a VALID convolution."""
    kx, kk = jax.random.split(jax.random.key(1))
    x = _pm1(kx, (1, 4, 4, 3))
    kernel = _pm1(kk, (3, 3, 3, 2))
    y = ops.binary_conv2d(x, kernel, 1, "SAME", -1.0, impl="xla")
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    k = np.asarray(kernel)
    want = np.zeros((1, 4, 4, 2), np.float32)
    for i in range(4):
        for j in range(4):
            want[0, i, j] = np.einsum("hwc,hwco->o", xp[0, i : i + 3, j : j + 3], k)
    np.testing.assert_array_equal(np.asarray(y), want)


@pytest.mark.slow
def test_conv_arbitrary_channel_scales_within_float_tolerance():
    """XNOR-Net's α = mean|W| is not a power of two: one rounding instead of many."""
    kx, kk, ka, kg = jax.random.split(jax.random.key(2), 4)
    x = _pm1(kx, (2, 6, 6, 48))
    alpha = jax.random.uniform(ka, (5,), minval=0.01, maxval=1.5).at[2].set(0.0)  # a dead channel
    kernel = _scaled_kernel(kk, (3, 3, 48, 5), alpha)
    op = jax.tree_util.Partial(lambda a, b, impl: ops.binary_conv2d(a, b, impl=impl))
    got, want = _both(x, kernel, jax.random.normal(kg, (2, 6, 6, 5)), op)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-6, atol=1e-5)
    assert not np.any(np.asarray(got[0][..., 2]))
    _assert_grads_close(got[1:], want[1:])


@pytest.mark.parametrize("lead,k,n", [((4,), 70, 9), ((2, 3), 64, 16), ((5,), 2048 + 1, 3)])
def test_dense_xnor_matches_xla(lead, k, n):
    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = _pm1(kx, (*lead, k))
    kernel = _scaled_kernel(kk, (k, n), [0.5 if i % 2 else 1.0 for i in range(n)])
    op = jax.tree_util.Partial(lambda a, b, impl: ops.binary_dense(a, b, impl=impl))
    got, want = _both(x, kernel, jax.random.normal(kg, (*lead, n)), op)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    _assert_grads_close(got[1:], want[1:])


@pytest.mark.slow
def test_bfloat16_inputs_keep_their_dtype():
    kx, kk = jax.random.split(jax.random.key(4))
    x = _pm1(kx, (2, 5, 5, 8), jnp.bfloat16)
    kernel = _pm1(kk, (3, 3, 8, 4), jnp.bfloat16)
    op = jax.tree_util.Partial(lambda a, b, impl: ops.binary_conv2d(a, b, impl=impl))
    (y, dx, dk), (y_ref, _, _) = _both(x, kernel, jnp.ones((2, 5, 5, 4), jnp.bfloat16), op)
    assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
    # |y| <= 72 is an integer: exact in bfloat16.
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))


def test_auto_picks_by_backend_and_falls_back_for_other_pad_values():
    assert ops.default_impl("cpu") == "xnor"
    assert ops.default_impl("gpu") == ops.default_impl("tpu") == "xla"
    kx, kk = jax.random.split(jax.random.key(5))
    x, kernel = _pm1(kx, (1, 4, 4, 3)), _pm1(kk, (3, 3, 3, 2))
    np.testing.assert_array_equal(
        np.asarray(ops.binary_conv2d(x, kernel, pad_value=0.5)),
        np.asarray(ops.binary_conv2d(x, kernel, pad_value=0.5, impl="xla")),
    )


def test_bad_arguments_raise_clear_errors():
    x, kernel = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2))
    with pytest.raises(ValueError, match="Unknown impl 'fast'"):
        ops.binary_conv2d(x, kernel, impl="fast")
    with pytest.raises(ValueError, match="pad_value=0.5"):
        ops.binary_conv2d(x, kernel, pad_value=0.5, impl="xnor")
    with pytest.raises(ValueError, match="padding must be"):
        ops.binary_conv2d(x, kernel, padding="FULL")
    with pytest.raises(ValueError, match="4 channels"):
        ops.binary_conv2d(jnp.ones((1, 4, 4, 4)), kernel)
    with pytest.raises(ValueError, match="does not fit"):
        ops.binary_conv2d(jnp.ones((1, 2, 2, 3)), kernel, padding="VALID")
    with pytest.raises(ValueError, match="binary_dense takes"):
        ops.binary_dense(jnp.ones((2, 5)), jnp.ones((4, 3)))


def test_fast_path_supported_only_for_sign_valued_quantizers():
    assert ops.fast_path_supported("ste_sign", "ste_sign")
    assert ops.fast_path_supported("ede_sign", "libra_pb")
    assert ops.fast_path_supported("approx_sign", "xnor_weight")
    assert not ops.fast_path_supported(None, "ste_sign")  # float input
    assert not ops.fast_path_supported("ste_sign", None)  # float kernel
    assert not ops.fast_path_supported("tanh_sign", "ste_sign")  # soft while training
    assert not ops.fast_path_supported("ste_heaviside", "ste_sign")  # {0, 1}
    assert not ops.fast_path_supported("ste_sign", "ste_tern")
    assert not ops.fast_path_supported(jnp.sign, "ste_sign")  # a callable's values are unknown


#: How far every batch-norm output of the model test below stays from the binarizers'
#: kinks: sign's 0 and the STE's clip at ±1. XLA fuses the two formulations' steps
#: differently, so their batch statistics may round apart by ~1e-7; a value within that
#: of a kink would flip a sign or a gradient mask on one side only.
MARGIN = 1e-5


def _margins(model, variables, x) -> float:
    """The smallest distance of any BatchNorm output (train mode) from 0 or ±1."""
    import flax

    apply = functools.partial(
        model.apply, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    _, state = jax.jit(apply)(variables, x)
    outputs = flax.traverse_util.flatten_dict(state["intermediates"])
    values = [np.asarray(v[0]) for path, v in outputs.items() if "bn" in path[0]]
    assert len(values) == 5  # bn0..bn3, fc_bn0
    return min(float(np.min(np.minimum(np.abs(v), np.abs(np.abs(v) - 1)))) for v in values)


@pytest.mark.slow
def test_model_training_gradients_same_through_layers(monkeypatch):
    """BinaryConv/BinaryDense route through binax.ops: same logits and gradients as the
    plain formulation (what a user's training step computes).

    Train-mode batch norm over the integer sums of binary layers makes ties: a channel
    whose outputs all equal their mean normalizes to exactly 0, where sign is decided by
    rounding. Random β per channel moves those off 0, and the comparison is made only
    with every BatchNorm output at least MARGIN from sign's and the STE's kinks
    (checked), so it holds under any float32 rounding of the statistics."""
    import optax

    from binax import models

    model = models.create("cnn_small", widths=(8, 8, 16, 40), hidden_dense=(24,), pad_values=-1.0)
    x = jax.random.normal(jax.random.key(7), (3, 8, 8, 1))
    labels = jnp.array([1, 4, 9])
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(8), x)
    rng = np.random.default_rng(0)
    params = {
        name: {**p, "bias": rng.uniform(-0.5, 0.5, p["bias"].shape).astype(np.float32)} if "bn" in name else p
        for name, p in variables["params"].items()
    }
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    assert _margins(model, variables, x) > MARGIN

    def loss_and_grads():
        def loss(params):
            logits, _ = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

    def uses_popcount():
        apply = lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])  # noqa: E731
        return "population_count" in str(jax.make_jaxpr(apply)(variables))

    assert uses_popcount()
    (loss_fast, logits_fast), grads_fast = loss_and_grads()
    monkeypatch.setattr(ops_binary, "default_impl", lambda backend=None: "xla")
    assert not uses_popcount()
    (loss_ref, logits_ref), grads_ref = loss_and_grads()
    np.testing.assert_allclose(np.asarray(logits_fast), np.asarray(logits_ref), rtol=1e-5, atol=1e-5)
    flat_fast, flat_ref = jax.tree.leaves_with_path(grads_fast), jax.tree.leaves(grads_ref)
    for (path, g), w in zip(flat_fast, flat_ref):
        scale = float(jnp.max(jnp.abs(w))) or 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale, err_msg=str(path))


@pytest.mark.parametrize("shape,window,strides", [((2, 8, 6, 3), (2, 2), None), ((1, 7, 9, 2), (2, 3), (2, 3)), ((1, 6, 6, 2), (3, 3), (2, 2))])
def test_max_pool_matches_flax_values_and_gradients_with_ties(shape, window, strides):
    import flax.linen as nn

    # Integer values (as binary layers produce) tie often inside a window.
    x = jnp.round(jax.random.normal(jax.random.key(9), shape) * 1.5)
    fns = (
        lambda v: ops.max_pool(v, window, strides),
        lambda v: nn.max_pool(v, window, strides=strides or window),
    )

    @jax.jit
    def both(x):
        outs = []
        for fn in fns:
            y, vjp = jax.vjp(fn, x)
            outs.append((y, vjp(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) + 1.0)[0]))
        return outs

    (y, dx), (y_ref, dx_ref) = both(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
