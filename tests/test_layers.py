"""binax.layers and BinaryBN folding (binax.transforms.fold_bn_sign): exact numerics."""

import gzip
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from binax import binarizers, layers, transforms

# rbg keys: threefry initialisers take tens of seconds to compile on a loaded 2-core CPU.
KEY = jax.random.key(0, impl="rbg")
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def _sign(x):
    return np.where(np.asarray(x) >= 0, 1.0, -1.0).astype(np.float32)


def _conv_valid(x, w, strides=(1, 1), groups=1):
    return lax.conv_general_dilated(
        x, w, strides, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )


# ------------------------------------------------------------------------ padding


@pytest.mark.parametrize("pad_values, expected_pad", [(None, 1.0), (-1.0, -1.0), (1.0, 1.0)])
@pytest.mark.parametrize("strides", [1, 2])
def test_binarized_same_conv_is_pad_with_value_then_valid(pad_values, expected_pad, strides):
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
    layer = layers.BinaryConv(
        4, (3, 3), strides, "SAME", pad_values=pad_values, input_quantizer="ste_sign", kernel_quantizer="ste_sign"
    )
    params = layer.init(KEY, x)["params"]
    y = layer.apply({"params": params}, x)

    xb = _sign(x)
    pads = lax.padtype_to_pads((7, 6), (3, 3), (strides, strides), "SAME")
    xp = np.pad(xb, [(0, 0), *pads, (0, 0)], constant_values=expected_pad)
    ref = _conv_valid(xp, _sign(params["latent_kernel"]), (strides, strides))
    assert y.shape == ref.shape == (2, -(-7 // strides), -(-6 // strides), 4)
    np.testing.assert_array_equal(y, ref)  # integer-valued sums: exact


def test_default_pad_is_plus_one_and_differs_from_zero_padding():
    # Guards the semantics: a binarized conv must not see zeros at the border.
    x = -jnp.ones((1, 4, 4, 1))  # sign(x) = -1 everywhere
    layer = layers.BinaryConv(1, (3, 3), input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    params = {"latent_kernel": jnp.ones((3, 3, 1, 1))}
    y = np.asarray(layer.apply({"params": params}, x))[0, :, :, 0]
    # Interior: 9 * (-1); corner: 4 * (-1) + 5 * (+1 padding) = 1; edge: 6 * (-1) + 3 = -3.
    assert y[1, 1] == -9 and y[0, 0] == 1 and y[0, 1] == -3


def test_float_conv_matches_flax_conv():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    ours = layers.BinaryConv(5, (3, 3), 2, "SAME")
    params = ours.init(KEY, x)["params"]
    assert set(params) == {"kernel"}
    ref = nn.Conv(5, (3, 3), 2, "SAME", use_bias=False).apply({"params": params}, x)
    np.testing.assert_allclose(ours.apply({"params": params}, x), ref, rtol=1e-6, atol=1e-6)


def test_conv1d_and_depthwise_padding():
    x = jax.random.normal(jax.random.key(3), (2, 9, 4))
    c1 = layers.BinaryConv(3, (3,), input_quantizer="ste_sign", kernel_quantizer="ste_sign", pad_values=-1.0)
    p1 = c1.init(KEY, x)["params"]
    xp = np.pad(_sign(x), [(0, 0), (1, 1), (0, 0)], constant_values=-1.0)
    ref = lax.conv_general_dilated(
        xp, _sign(p1["latent_kernel"]), (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )
    np.testing.assert_array_equal(c1.apply({"params": p1}, x), ref)

    x2 = jax.random.normal(jax.random.key(4), (1, 5, 5, 3))
    dw = layers.BinaryDepthwiseConv((3, 3), depth_multiplier=2, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    p2 = dw.init(KEY, x2)["params"]
    assert p2["latent_kernel"].shape == (3, 3, 1, 6)
    xp2 = np.pad(_sign(x2), [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=1.0)
    ref2 = _conv_valid(xp2, _sign(p2["latent_kernel"]), groups=3)
    np.testing.assert_array_equal(dw.apply({"params": p2}, x2), ref2)


def test_conv_rejects_wrong_rank():
    layer = layers.BinaryConv(2, (3, 3))
    with pytest.raises(ValueError, match="rank 4"):
        layer.init(KEY, jnp.ones((4, 4, 3)))


# ------------------------------------------------------------------ dense, naming


def test_binary_dense_is_sign_times_sign_and_names_its_kernels():
    x = jax.random.normal(jax.random.key(5), (3, 6))
    layer = layers.BinaryDense(4, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    params = layer.init(KEY, x)["params"]
    assert set(params) == {"latent_kernel"}
    np.testing.assert_array_equal(layer.apply({"params": params}, x), _sign(x) @ _sign(params["latent_kernel"]))
    float_params = layers.BinaryDense(4, use_bias=True).init(KEY, x)["params"]
    assert set(float_params) == {"kernel", "bias"}


def test_unknown_binarizer_name_raises():
    with pytest.raises(ValueError, match="Unknown binarizer 'stesign'"):
        layers.BinaryDense(2, input_quantizer="stesign").init(KEY, jnp.ones((1, 3)))


def test_callable_quantizer_and_kwargs_reach_the_binarizer():
    x = jnp.array([[0.5, -2.0, 3.0]])
    layer = layers.BinaryDense(
        1, input_quantizer="ste_sign", input_quantizer_kwargs={"clip_value": 2.5}, kernel_quantizer=binarizers.sign
    )
    params = {"latent_kernel": jnp.ones((3, 1))}
    g = jax.grad(lambda x: layer.apply({"params": params}, x).sum())(x)
    np.testing.assert_array_equal(g, [[1.0, 1.0, 0.0]])  # |3| > clip 2.5


def test_progress_reaches_the_schedule():
    # EDE backward k*t*(1 - tanh(t x)^2) at x = 0 is k*t = max(t, 1): it grows with progress.
    layer = layers.BinaryDense(1, input_quantizer="ede_sign", input_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0})
    params = {"kernel": jnp.ones((1, 1))}
    grad = jax.jit(jax.grad(lambda x, p: layer.apply({"params": params}, x, progress=p).sum()))
    g0, g1 = grad(jnp.zeros((1, 1)), 0.0), grad(jnp.zeros((1, 1)), 1.0)
    np.testing.assert_allclose([g0[0, 0], g1[0, 0]], [1.0, 10.0], rtol=1e-5)


# ------------------------------------------------------------------------- ABC-Net


def _abc_double_sum_conv(x, params, m, strides, pad):
    bases, alphas = binarizers.abc_weight_bases(params["latent_kernel"], m)
    out = 0.0
    for mi in range(m):
        for v, beta in zip(params["shifts"], params["betas"]):
            h = 2.0 * (jnp.clip(x + v, 0, 1) >= 0.5) - 1.0
            hp = jnp.pad(h, [(0, 0), *pad, (0, 0)], constant_values=1.0)
            out = out + alphas[mi] * beta * _conv_valid(hp, bases[mi], strides)
    return out


@pytest.mark.parametrize("m, n, strides", [(3, 2, 1), (2, 3, 2), (1, 1, 1)])
def test_abc_conv_equals_explicit_double_sum(m, n, strides):
    x = jax.random.normal(jax.random.key(6), (2, 6, 5, 3))
    layer = layers.ABCConv(4, (3, 3), strides, "SAME", m=m, n=n)
    params = layer.init(KEY, x)["params"]
    # Learned shifts/betas away from their initial values.
    params = dict(params, shifts=params["shifts"] + 0.1, betas=params["betas"] * jnp.arange(1.0, n + 1))
    pad = lax.padtype_to_pads((6, 5), (3, 3), (strides, strides), "SAME")
    ref = _abc_double_sum_conv(x, params, m, (strides, strides), pad)
    np.testing.assert_allclose(layer.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)


def test_abc_dense_equals_explicit_double_sum():
    m, n = 3, 2
    x = jax.random.normal(jax.random.key(7), (4, 5))
    layer = layers.ABCDense(3, m=m, n=n)
    params = layer.init(KEY, x)["params"]
    bases, alphas = binarizers.abc_weight_bases(params["latent_kernel"], m)
    ref = sum(
        alphas[i] * b * ((2.0 * (jnp.clip(x + v, 0, 1) >= 0.5) - 1.0) @ bases[i])
        for i in range(m)
        for v, b in zip(params["shifts"], params["betas"])
    )
    np.testing.assert_allclose(layer.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- ReActNet


def test_rsign_and_rprelu_formulas():
    x = jnp.array([[-0.3, 0.2, 0.0], [0.9, -1.5, 0.05]])
    shift = jnp.array([0.3, -0.1, 0.0])
    rs = layers.RSign()
    y = rs.apply({"params": {"shift": shift}}, x)
    np.testing.assert_array_equal(y, _sign(x + shift))
    g = jax.grad(lambda x: rs.apply({"params": {"shift": shift}}, x).sum())(x)
    np.testing.assert_allclose(g, np.maximum(0, 2 - 2 * np.abs(x + shift)), rtol=1e-6)

    p = {
        "shift_in": jnp.array([0.1, -0.2, 0.0]),
        "slope": jnp.array([0.25, 0.5, 1.0]),
        "shift_out": jnp.array([1.0, 0.0, -1.0]),
    }
    z = np.asarray(x) + np.asarray(p["shift_in"])
    ref = np.where(z > 0, z, np.asarray(p["slope"]) * z) + np.asarray(p["shift_out"])
    np.testing.assert_allclose(layers.RPReLU().apply({"params": p}, x), ref, rtol=1e-6)


# ------------------------------------------------------------ latent-weight clipping


def test_clip_latent_weights_touches_only_latent_kernels():
    params = {
        "a": {"latent_kernel": jnp.array([-2.0, 0.5, 3.0]), "bias": jnp.array([5.0])},
        "b": {"kernel": jnp.array([4.0])},
    }
    out = jax.jit(layers.clip_latent_weights, static_argnums=1)(params, 1.0)
    np.testing.assert_array_equal(out["a"]["latent_kernel"], [-1.0, 0.5, 1.0])
    np.testing.assert_array_equal(out["a"]["bias"], [5.0])
    np.testing.assert_array_equal(out["b"]["kernel"], [4.0])
    assert layers.clip_latent_weights(params, None) is params
    assert layers.latent_kernel_mask(params) == {"a": {"latent_kernel": True, "bias": False}, "b": {"kernel": False}}


# --------------------------------------------------------------- BinaryBN folding


def _jit_bn_sign(scale, bias, mean, var, x, eps=1e-5):
    """The reference: Flax BatchNorm (inference) then binax's sign, jitted as a model is."""
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
    bn = nn.BatchNorm(use_running_average=True, epsilon=eps)
    return np.asarray(jax.jit(lambda v, x: binarizers.sign(bn.apply(v, x)))(v, x))


def _binary_bn(threshold, s, x):
    return np.asarray(layers.BinaryBatchNorm().apply({"params": {"threshold": threshold, "sign": s}}, x))


def _boundary_values(threshold, count=20):
    """Each channel's threshold and its ``count`` float32 neighbours on both sides."""
    t = np.where(np.isfinite(threshold), threshold, 0).astype(np.float32)
    rows, up, down = [t], t, t
    big = np.float32(3e38)
    for _ in range(count):
        up, down = np.nextafter(up, big), np.nextafter(down, -big)
        rows += [up, down]
    return np.stack(rows)


def _naive_fold(scale, bias, mean, var, x, eps=1e-5):
    with np.errstate(all="ignore"):
        tau = mean - bias * np.sqrt(var + np.float32(eps)) / scale
        return np.where(scale == 0, _sign(bias), np.where(scale > 0, 1.0, -1.0) * _sign(x - tau))


def _random_stats(rng, c):
    scale = rng.normal(size=c).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    scale[:3] = 0.0  # gamma = 0: constant sign(beta)
    scale[3] = -0.0
    bias[0], bias[1], bias[2] = -0.5, 0.0, 0.7  # constant -1, +1 (sign(0) = +1), +1
    bias[4:8] = 0.0  # beta = 0: threshold at the mean
    scale[8:16] = -np.abs(scale[8:16])  # gamma < 0
    mean = rng.normal(size=c).astype(np.float32)
    var = rng.uniform(1e-3, 4.0, size=c).astype(np.float32)
    return scale, bias, mean, var


def test_fold_bn_sign_is_exact_on_random_statistics():
    rng = np.random.default_rng(0)
    c = 32
    scale, bias, mean, var = _random_stats(rng, c)
    threshold, s = transforms.fold_bn_sign(scale, bias, mean, var)
    assert set(np.unique(s)) <= {-1.0, 1.0}
    x = np.concatenate(
        [
            (3 * rng.normal(size=(4096, c))).astype(np.float32),
            _boundary_values(threshold),
            np.broadcast_to(mean, (1, c)),  # x = mu exactly
            np.zeros((1, c), np.float32),
            -np.zeros((1, c), np.float32),
            np.full((2, c), [[3e38], [-3e38]], np.float32),
        ]
    )
    ref = _jit_bn_sign(scale, bias, mean, var, x)
    np.testing.assert_array_equal(_binary_bn(threshold, s, x), ref)
    # gamma = 0 channels are constants sign(beta).
    np.testing.assert_array_equal(ref[:, :3], np.broadcast_to([-1.0, 1.0, 1.0], (len(x), 3)))
    # The closed form tau = mu - beta*sigma/gamma misses boundary cases this data contains.
    assert np.any(_naive_fold(scale, bias, mean, var, x) != ref)


def _fashion_mnist_activations(n=512):
    if not os.path.exists(FMNIST):
        pytest.skip(f"{FMNIST} not installed")
    with gzip.open(FMNIST) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784]
    images = raw.reshape(n, 28, 28, 1).astype(np.float32) / 255.0
    # A fixed random conv layer: real activations, many exact repeats (blank background).
    w = jax.random.normal(jax.random.key(8), (3, 3, 1, 16)) / 3.0
    return np.asarray(_conv_valid(jnp.asarray(images), w)).reshape(-1, 16)


def test_fold_bn_sign_is_exact_on_fashion_mnist_activations():
    acts = _fashion_mnist_activations()
    rng = np.random.default_rng(1)
    c = acts.shape[1]
    mean, var = acts.mean(0), acts.var(0)  # "trained" statistics of this data
    scale = rng.normal(size=c).astype(np.float32)
    scale[0], scale[1] = 0.0, -1.0
    # Put each channel's threshold ON a data value: beta = -(x0 - mu) * gamma / sigma, so
    # BN(x0) is 0 up to rounding and many activations (repeats of x0) sit at the boundary.
    x0 = acts[rng.integers(0, len(acts), size=c), np.arange(c)]
    bias = (-(x0 - mean) * scale / np.sqrt(var + np.float32(1e-5))).astype(np.float32)
    bias[2] = 0.0
    threshold, s = transforms.fold_bn_sign(scale, bias, mean, var)
    ref = _jit_bn_sign(scale, bias, mean, var, acts)
    np.testing.assert_array_equal(_binary_bn(threshold, s, acts), ref)
    near = _boundary_values(threshold)
    np.testing.assert_array_equal(_binary_bn(threshold, s, near), _jit_bn_sign(scale, bias, mean, var, near))
    assert np.sum(acts == x0) > c  # the boundary is really exercised


def test_fold_bn_sign_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D scale"):
        transforms.fold_bn_sign(np.ones(3), np.ones(3), np.ones(2), np.ones(3))
