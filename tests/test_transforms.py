"""Model surgery from the recipes: BinaryDuo decoupling and the Self-Binarizing sign swap."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import binax
from binax import binarizers, models, transforms

KEY = jax.random.key(0, impl="rbg")  # cheap to compile on CPU


def _randomize_bn(variables, key):
    """Trained-looking BN statistics and affine parameters (identity BN is too easy)."""
    params, stats = jax.tree.map(lambda a: a, dict(variables["params"])), dict(variables["batch_stats"])
    for i, (name, bn) in enumerate(sorted(stats.items())):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, i), 4)
        c = bn["mean"].shape[-1]
        stats[name] = {"mean": jax.random.normal(k1, (c,)) * 0.3, "var": jax.random.uniform(k2, (c,), minval=0.3, maxval=2.0)}
        params[name] = {"scale": jax.random.normal(k3, (c,)), "bias": 0.4 + 0.3 * jax.random.normal(k4, (c,))}
    return {"params": params, "batch_stats": stats}


def _consumer_inputs(model, variables, x):
    """The quantized input every consumer layer sees, by module name."""
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and getattr(mod, "input_quantizer", None) is not None:
            fn = binarizers.resolve(mod.input_quantizer, **dict(mod.input_quantizer_kwargs or {}))
            seen[mod.name] = fn(args[0], 1.0)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, train=False)
    return logits, seen


DUO = dict(input_quantizer="duo_ternary", kernel_quantizer="duo_weight", latent_weight_clip=None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides, shape",
    [
        ("bnn_mlp", dict(widths=(24, 16, 12), last_layer_float=False), (28, 28, 1)),
        ("bnn_mlp", dict(widths=(24, 16)), (28, 28, 1)),
        ("cnn_small", dict(width_multiplier=0.25), (28, 28, 1)),
        ("vgg7_tiny", dict(width_multiplier=0.2), (32, 32, 3)),
    ],
)
def test_binaryduo_decoupling_is_exact(name, overrides, shape):
    model = models.create(name, **DUO, **overrides)
    x = jax.random.uniform(jax.random.key(1), (16, *shape))
    variables = _randomize_bn(model.init(KEY, x[:1]), jax.random.key(2))
    coupled_logits, coupled_in = _consumer_inputs(model, variables, x)

    dmodel, dvars, overrides_out = transforms.decouple_binaryduo_model(model, variables)
    decoupled_logits, decoupled_in = _consumer_inputs(dmodel, dvars, x)
    # The decoupled model is what create() builds from the returned overrides.
    rebuilt = models.create(name, **{**DUO, **overrides, **overrides_out})
    assert jax.tree.map(jnp.shape, rebuilt.init(KEY, x[:1])) == jax.tree.map(jnp.shape, dvars)
    # Tied copies (the official nn.Replicate): every producer keeps its kernel, so the
    # decoupled network has the coupled one's binary-op count (ternary = 2 binary).
    for producer, bn, _ in transforms.binaryduo_couplings(model):
        key = transforms._kernel_key(variables["params"][producer], producer)
        c = variables["params"][producer][key].shape[-1]
        assert dvars["params"][producer][key].shape[-1] == c and dvars["params"][bn]["scale"].shape == (2 * c,)
    coupled_cost = binax.summary(model, shape).totals
    decoupled_cost = binax.summary(dmodel, shape).totals
    assert decoupled_cost.binary_ops == coupled_cost.binary_ops > 0

    couplings = transforms.binaryduo_couplings(model)
    assert couplings, "nothing was decoupled"
    for producer, _, consumer in couplings:
        t = np.asarray(coupled_in[consumer])
        b = np.asarray(decoupled_in[consumer])
        assert set(np.unique(t)) <= {0.0, 0.5, 1.0} and set(np.unique(b)) <= {0.0, 1.0}
        assert 0.0 in t and 0.5 in t and 1.0 in t, "ternary levels not exercised"
        # Channels are last in NHWC and in a flattened (H*W*C) vector: view both as
        # (N, pixels, C) against (N, pixels, 2C).
        c = variables["params"][producer][transforms._kernel_key(variables["params"][producer], producer)].shape[-1]
        t = t.reshape(t.shape[0], -1, c)
        b = b.reshape(b.shape[0], -1, 2 * c)
        # Exact: ternary(y) == (1[y + 1/4 >= 1/2] + 1[y - 1/4 >= 1/2]) / 2, element by element.
        np.testing.assert_array_equal(t, (b[..., :c] + b[..., c:]) / 2)
    np.testing.assert_allclose(decoupled_logits, coupled_logits, rtol=1e-5, atol=1e-5)
    # Predictions wherever the top two logits are further apart than that tolerance: a
    # binary classifier's logits tie exactly (sums of ±1), and the arg max of a tie is
    # decided by rounding.
    coupled_logits = np.asarray(coupled_logits)
    top2 = np.sort(coupled_logits, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5 + 1e-5 * np.abs(top2[:, 1])
    assert clear.sum() >= len(clear) // 2, "too many tied predictions to compare"
    np.testing.assert_array_equal(np.argmax(decoupled_logits, -1)[clear], coupled_logits.argmax(-1)[clear])


def test_decouple_binaryduo_param_rules():
    k = jnp.arange(2 * 3, dtype=jnp.float32).reshape(2, 3)
    nxt = jnp.arange(3 * 2, dtype=jnp.float32).reshape(3, 2)
    variables = {
        "params": {"a": {"kernel": k}, "bn": {"scale": jnp.array([1.0, 2, 3]), "bias": jnp.array([0.1, 0.2, 0.3])},
                   "b": {"latent_kernel": nxt}},
        "batch_stats": {"bn": {"mean": jnp.array([1.0, 2, 3]), "var": jnp.array([4.0, 5, 6])}},
    }
    out = transforms.decouple_binaryduo(variables, [("a", "bn", "b")])
    np.testing.assert_array_equal(out["params"]["a"]["kernel"], k)  # tied: the model copies its output
    np.testing.assert_allclose(out["params"]["bn"]["bias"], [0.35, 0.45, 0.55, -0.15, -0.05, 0.05], rtol=1e-6)
    np.testing.assert_array_equal(out["params"]["bn"]["scale"], [1, 2, 3, 1, 2, 3])
    np.testing.assert_array_equal(out["batch_stats"]["bn"]["var"], [4, 5, 6, 4, 5, 6])
    np.testing.assert_array_equal(out["params"]["b"]["latent_kernel"], jnp.concatenate([nxt, nxt], 0) / 2)
    # The input is not modified.
    assert variables["params"]["a"]["kernel"].shape == (2, 3)


@pytest.mark.slow
def test_decoupling_rejects_what_it_cannot_keep_exact():
    x = jnp.zeros((1, 28, 28, 1))
    m = models.create("bnn_mlp", widths=(8, 8), input_quantizer="duo_ternary", kernel_quantizer="ste_sign")
    with pytest.raises(ValueError, match="scale-equivariant"):
        transforms.decouple_binaryduo_model(m, m.init(KEY, x))
    m = models.create("bnn_mlp", widths=(8, 8), input_quantizer="duo_binary", kernel_quantizer="duo_weight")
    with pytest.raises(ValueError, match="duo_ternary"):
        transforms.decouple_binaryduo_model(m, m.init(KEY, x))
    m = models.create("resnet20", width_multiplier=0.25, **DUO)
    with pytest.raises(ValueError, match="layer chain"):
        transforms.decouple_binaryduo_model(m, m.init(KEY, jnp.zeros((1, 32, 32, 3))))


def test_self_binarizing_inference_matches_tanh_model_at_large_nu():
    sb = dict(input_quantizer="tanh_sign", input_quantizer_kwargs={"nu_max": 1e6},
              kernel_quantizer="tanh_sign", kernel_quantizer_kwargs={"nu_max": 1e6}, activation="tanh")
    model = models.create("bnn_mlp", widths=(32, 32), **sb)
    x = jax.random.uniform(jax.random.key(3), (64, 28, 28, 1))
    variables = _randomize_bn(model.init(KEY, x[:1]), jax.random.key(4))
    folded, fvars = transforms.self_binarizing_inference(model, variables, (28, 28, 1))
    assert folded.input_quantizer == "sign" and folded.kernel_quantizer == "sign" and folded.binary_bn
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False, progress=1.0))(variables, x)
    out = jax.jit(lambda v, x: folded.apply(v, x, train=False))(fvars, x)
    np.testing.assert_array_equal(jnp.argmax(out, -1), jnp.argmax(ref, -1))
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="tanh_sign"):
        transforms.self_binarizing_inference(models.create("bnn_mlp", widths=(8,)), {}, (28, 28, 1))
