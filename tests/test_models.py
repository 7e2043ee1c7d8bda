"""binax.models: the registry contract, every architecture's parameter count (by hand),
forward + backward, one trace across progress values, input errors, method recipes, and
BinaryBN folding of whole models."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import binax
from binax import layers, models, transforms

KEY = jax.random.key(0, impl="rbg")  # threefry initialisers compile slowly on 2 cores
# These tests check numbers and shapes, not speed: halve XLA:CPU compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

EXPECTED_NAMES = [
    "alexnet",
    "bnn_mlp",
    "cnn_small",
    "reactnet18",
    "resnet18",
    "resnet18_cifar",
    "resnet20",
    "resnet34",
    "vgg7_tiny",
    "vgg_small",
]


# ------------------------------------------------------------- counts by hand


def _bn(c):
    return 2 * c  # scale and bias (the statistics live in batch_stats)


def _mlp_count(cfg, inputs):
    n, prev = 0, inputs
    for w in cfg.widths:
        n += prev * w + _bn(w)
        prev = w
    return n + prev * cfg.num_classes + cfg.num_classes


def _vgg_count(cfg, hw, channels):
    n, prev = 0, channels
    for w in cfg.widths:
        n += 9 * prev * w + _bn(w)
        prev = w
    side = hw // 2 ** len(cfg.pool_after)
    prev = side * side * prev
    for w in cfg.hidden_dense:
        n += prev * w + _bn(w)
        prev = w
    return n + prev * cfg.num_classes + cfg.num_classes


def _resnet_count(cfg, channels):
    widths = cfg.stage_widths
    k = 7 if cfg.stem == "imagenet" else 3
    n = k * k * channels * widths[0] + _bn(widths[0])
    prev = widths[0]
    for s, (blocks, w) in enumerate(zip(cfg.stage_sizes, widths)):
        for b in range(blocks):
            for u in range(2):  # a basic block: two convs, each with its own shortcut
                n += 9 * prev * w + _bn(w)
                if cfg.learnable_shift:
                    n += prev  # RSign shift on the conv's input
                if cfg.activation == "rprelu":
                    n += 3 * w
                downsample = (s > 0 and b == 0 and u == 0) or prev != w
                if downsample and cfg.shortcut in ("B", "avgpool"):
                    n += prev * w + _bn(w)  # 1x1 conv + BN
                prev = w
    if cfg.head_bn:
        n += _bn(prev)
    return n + prev * cfg.num_classes + cfg.num_classes


def _alexnet_count(cfg, final_side, channels):
    kernels = (11, 5, 3, 3, 3)
    n, prev = 0, channels
    for k, w in zip(kernels, cfg.conv_widths):
        n += k * k * prev * w + _bn(w)
        prev = w
    prev = final_side * final_side * prev
    for w in cfg.fc_widths:
        n += prev * w + _bn(w)
        prev = w
    return n + prev * cfg.num_classes + cfg.num_classes


def _count(name, cfg, shape):
    if name == "bnn_mlp":
        return _mlp_count(cfg, math.prod(shape))
    if name in ("cnn_small", "vgg_small", "vgg7_tiny"):
        return _vgg_count(cfg, shape[0], shape[-1])
    if name == "alexnet":
        side = {224: 6, 64: 1}[shape[0]]
        return _alexnet_count(cfg, side, shape[-1])
    return _resnet_count(cfg, shape[-1])


# Full-size configs at their data's input shape (counted with eval_shape only).
FULL = {
    "bnn_mlp": (28, 28, 1),
    "cnn_small": (28, 28, 1),
    "vgg_small": (32, 32, 3),
    "vgg7_tiny": (32, 32, 3),
    "resnet20": (32, 32, 3),
    "resnet18_cifar": (32, 32, 3),
    "resnet18": (224, 224, 3),
    "resnet34": (224, 224, 3),
    "reactnet18": (224, 224, 3),
    "alexnet": (224, 224, 3),
}

# Narrow versions for the real forward/backward pass (widths replaced, same topology).
SMALL = {
    "bnn_mlp": ((28, 28, 1), dict(widths=(16, 16, 16))),
    "cnn_small": ((28, 28, 1), dict(widths=(4, 4, 8, 8))),
    "vgg_small": ((32, 32, 3), dict(widths=(4, 4, 8, 8, 8, 8))),
    "vgg7_tiny": ((32, 32, 3), dict(widths=(4, 4, 8, 8), hidden_dense=(12, 16))),
    "resnet20": ((32, 32, 3), dict(stage_widths=(4, 8, 16))),
    "resnet18_cifar": ((16, 16, 3), dict(stage_widths=(4, 8, 8, 16))),
    "resnet18": ((32, 32, 3), dict(stage_widths=(4, 8, 8, 16))),
    "resnet34": ((32, 32, 3), dict(stage_widths=(4, 4, 8, 8))),
    "reactnet18": ((32, 32, 3), dict(stage_widths=(4, 8, 8, 16))),
    "alexnet": ((64, 64, 3), dict(conv_widths=(8, 8, 8, 8, 8), fc_widths=(16, 16))),
}


def _n_params(params):
    return sum(math.prod(a.shape) for a in jax.tree.leaves(params))


def test_registry_lists_the_zoo():
    assert models.names() == EXPECTED_NAMES
    assert set(FULL) == set(EXPECTED_NAMES) == set(SMALL)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_full_size_parameter_count_matches_the_architecture(name):
    shape = FULL[name]
    model = models.create(name)
    shapes = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    assert _n_params(shapes["params"]) == _count(name, models.get_config(name), shape)
    out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct((2, *shape), jnp.float32))
    assert out.shape == (2, models.get_config(name).num_classes)


@pytest.mark.parametrize("name", ["bnn_mlp", "cnn_small", "vgg7_tiny", "alexnet"])
def test_the_forward_runs_its_chain(name):
    """A sequential model writes its forward once (``steps()``): ``__call__`` runs it and
    ``chain()`` hands it to the exporter and BinaryDuo decoupling. What the steps say is
    what the built layers do: quantized inputs and kernels, widths from their keys."""
    shape, overrides = SMALL[name]
    model = models.create(name, last_layer_float=False, width_multiplier=0.5, **overrides)  # a float first kernel
    calls, _ = models.trace(model, shape)
    top = {c.path: c for c in calls if len(c.path) == 1}
    layers = [s for s in model.chain() if s.kind == "layer"]
    assert [s.path for s in layers] == [p for p, c in top.items() if hasattr(c.module, "kernel_quantizer")]
    for step in layers:
        module = top[step.path].module
        assert (module.input_quantizer is not None, module.kernel_quantizer is not None) == (
            step.quantize_input,
            step.quantize_kernel,
        ), step
        if step.width is not None:
            key, index = step.width
            assert top[step.path].out_shape[-1] == max(1, round(getattr(model, key)[index] * 0.5)), step
    if hasattr(model, "replicate"):  # BinaryDuo's copies between a layer and its BN: no chain
        assert model.clone(replicate=2).chain() is None
    assert models.create("resnet20").chain() is None  # residual: not one chain


def test_hand_counts_of_the_papers_architectures():
    # Guards the formulas above with the figures written out once.
    assert _count("bnn_mlp", models.get_config("bnn_mlp"), (28, 28, 1)) == (
        784 * 2048 + 2048 * 2048 * 2 + 2048 * 10 + 10 + 3 * 2 * 2048
    )
    vgg_convs = 3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512
    assert _count("vgg_small", models.get_config("vgg_small"), (32, 32, 3)) == (
        9 * vgg_convs + 2 * (128 * 2 + 256 * 2 + 512 * 2) + 512 * 4 * 4 * 10 + 10
    )
    # IR-Net ResNet-20 (option A: parameter-free shortcuts, BN1d before the FC): ~0.27M.
    assert _count("resnet20", models.get_config("resnet20"), (32, 32, 3)) == (
        27 * 16 + 2 * 16
        + 6 * (9 * 16 * 16 + 2 * 16)
        + (9 * 16 * 32 + 2 * 32) + 5 * (9 * 32 * 32 + 2 * 32)
        + (9 * 32 * 64 + 2 * 64) + 5 * (9 * 64 * 64 + 2 * 64)
        + 2 * 64 + 64 * 10 + 10
    )


# The residual networks, AlexNet and VGG-small take longest: the fast tier
# (-m "not slow") runs the others.
HEAVY = ("reactnet18", "resnet18_cifar", "resnet34", "resnet18", "resnet20", "alexnet", "vgg_small")
BY_COST = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in EXPECTED_NAMES]


@pytest.mark.parametrize("name", BY_COST)
def test_forward_backward_and_one_trace_over_progress(name):
    shape, overrides = SMALL[name]
    model = models.create(name, num_classes=7, **overrides)
    cfg = models.get_config(name)
    cfg.update(overrides, num_classes=7)
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    # model.init is traced here and run in test_binary_bn_folding_*; filling the shapes
    # from numpy saves a compile per model.
    variables = _fill(jax.eval_shape(model.init, KEY, x), np.random.default_rng(0))
    assert _n_params(variables["params"]) == _count(name, cfg, shape)
    chex.clear_trace_counter()  # the counter is global; `step` is redefined per model

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    @chex.assert_max_traces(n=1)
    def step(params, batch_stats, x, progress):
        def loss(params):
            variables = {"params": params, "batch_stats": batch_stats}
            logits, updates = model.apply(variables, x, train=True, progress=progress, mutable=["batch_stats"])
            return jnp.mean(logits**2), (logits, updates)

        return jax.grad(loss, has_aux=True)(params)

    grads = []
    for p in (0.0, 0.25, 0.5, 0.75, 1.0):  # python floats: traced values, not constants
        g, (logits, updates) = step(variables["params"], variables["batch_stats"], x, p)
        grads.append(g)
    chex.assert_shape(logits, (2, 7))
    chex.assert_tree_all_finite((logits, grads))
    assert set(updates) == {"batch_stats"}
    chex.assert_trees_all_equal_shapes(grads[-1], variables["params"])
    if name in ("vgg_small", "resnet20", "resnet18_cifar"):  # EDE schedules: progress reaches every layer
        for path, g0 in jax.tree_util.tree_leaves_with_path(grads[0]):
            if layers.is_latent_kernel_path(path):
                g1 = _get(grads[-1], path)
                assert not np.allclose(g0, g1), jax.tree_util.keystr(path)


def _fill(shapes, rng):
    """Concrete variables for ``shapes``: BN scales and variances 1, the rest N(0, 0.3^2)."""

    def leaf(path, s):
        if str(getattr(path[-1], "key", "")) in ("scale", "var"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


# -------------------------------------------------------------------- contract


def test_get_config_is_locked_and_create_applies_overrides():
    cfg = models.get_config("cnn_small")
    assert isinstance(cfg, ml_collections.ConfigDict)
    with pytest.raises(AttributeError):
        cfg.widht = 3
    for key in (
        "num_classes",
        "width_multiplier",
        "input_quantizer",
        "input_quantizer_kwargs",
        "kernel_quantizer",
        "kernel_quantizer_kwargs",
        "first_layer_float",
        "last_layer_float",
        "layer_type",
        "abc_m",
        "abc_n",
        "activation",
        "latent_weight_clip",
        "pad_values",
    ):
        assert key in cfg
    model = models.create("cnn_small", num_classes=3, width_multiplier=0.5)
    assert model.num_classes == 3 and model.width_multiplier == 0.5
    same = models.create("cnn_small", **models.get_config("cnn_small"))
    assert same == models.create("cnn_small")
    hash(models.create("vgg_small"))  # hashable: jit can take the module or its methods


def test_create_records_the_registry_name_on_the_model():
    """The name create() was given is read back from the model (and its clones), so
    nothing builds every registered model to guess it."""
    small = models.create("cnn_small", width_multiplier=0.5)
    assert models.registry_name(small) == "cnn_small"  # VGG, the class of vgg_small too
    assert models.registry_name(small.clone(pool_after=(2,))) == "cnn_small"
    assert models.registry_name(type(small)()) is None  # built by its class
    with pytest.raises(ValueError, match="identifier"):
        models.register("my net", type(small))
    assert "my net" not in models.names()


def test_unknown_names_and_keys_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown model 'resnet21'.*resnet20"):
        models.create("resnet21")
    with pytest.raises(ValueError, match="Unknown model"):
        models.get_config("nope")
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['num_clases'\].*num_classes"):
        models.create("bnn_mlp", num_clases=10)
    with pytest.raises(ValueError, match="Unknown binarizer 'ste_sgn'"):
        models.create("cnn_small", input_quantizer="ste_sgn")
    with pytest.raises(ValueError, match="Unknown keyword"):
        models.create("cnn_small", kernel_quantizer_kwargs={"clip": 1.0})
    with pytest.raises(ValueError, match="layer_type"):
        models.create("cnn_small", layer_type="ternary")
    with pytest.raises(ValueError, match="activation"):
        models.create("cnn_small", activation="gelu")
    with pytest.raises(ValueError, match="shortcut"):
        models.create("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="pool_after"):
        models.create("cnn_small", pool_after=(2, 5))


@pytest.mark.parametrize(
    "name, shape, match",
    [
        ("cnn_small", (2, 28, 28), "rank 4"),
        ("resnet20", (2, 32, 32, 3, 1), "rank 4"),
        ("vgg_small", (2, 4, 4, 3), "at least 8x8"),
        ("alexnet", (2, 32, 32, 3), "at least 63x63"),
        ("resnet18", (2, 16, 16, 3), "at least 32x32"),
        ("bnn_mlp", (784,), "rank >= 2"),
    ],
)
def test_inputs_a_model_cannot_take_raise(name, shape, match):
    model = models.create(name)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct(shape, jnp.float32))


def test_models_take_other_datasets_shapes():
    for name, shape in [("cnn_small", (32, 32, 3)), ("resnet20", (28, 28, 1)), ("resnet18", (64, 64, 3))]:
        model = models.create(name, num_classes=5)
        v = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
        assert jax.eval_shape(model.apply, v, jax.ShapeDtypeStruct((3, *shape), jnp.float32)).shape == (3, 5)


# ----------------------------------------------------------------- method recipes

RECIPES = {
    "bnn": dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", latent_weight_clip=1.0),
    "irnet": dict(
        input_quantizer="ede_sign",
        input_quantizer_kwargs={"t_min": 1e-3, "t_max": 10.0},
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs={"t_min": 1e-3, "t_max": 10.0},
    ),
    "xnor": dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight"),
    "dorefa": dict(input_quantizer="dorefa", input_quantizer_kwargs={"k_bit": 2}, kernel_quantizer="xnor_weight"),
    "bireal": dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight", activation="none"),
    "abc": dict(layer_type="abc", abc_m=3, abc_n=2),
    "self_binarizing": dict(
        input_quantizer="tanh_sign",
        input_quantizer_kwargs={"nu_0": 1.0, "nu_max": 100.0},
        kernel_quantizer="tanh_sign",
        kernel_quantizer_kwargs={"nu_0": 1.0, "nu_max": 100.0},
    ),
    "binaryduo": dict(input_quantizer="duo_ternary", kernel_quantizer="duo_weight", activation="none"),
    "reactnet_pieces": dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight", activation="rprelu"),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("name", ["bnn_mlp", "cnn_small", "resnet20"])
def test_method_recipes_are_configs(name, recipe):
    shape, overrides = SMALL[name]
    model = models.create(name, **overrides, **RECIPES[recipe])
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    v = jax.eval_shape(model.init, KEY, x)

    def loss(params, batch_stats, x):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, progress=0.5, mutable=["batch_stats"]
        )
        return logits.sum()

    grads = jax.eval_shape(jax.grad(loss), v["params"], v["batch_stats"], x)
    chex.assert_trees_all_equal_shapes(grads, v["params"])
    if name == "bnn_mlp":  # the summary's MAC rules are tested in test_summary.py
        s = binax.summary(model, shape)
        assert s.binary_macs > 0 or recipe == "dorefa"  # 2-bit DoReFa activations are not binary


# ------------------------------------------------------------ BinaryBN folding


def _trained_like(model, x, rng):
    """Initialise, run train-mode passes to accumulate batch statistics, then give the
    BN layers scales and biases of both signs, zeros included."""
    variables = jax.jit(model.init, compiler_options=FAST_COMPILE)(KEY, x)
    params, stats = variables["params"], variables["batch_stats"]
    apply = jax.jit(
        lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]),
        compiler_options=FAST_COMPILE,
    )
    for i in range(3):
        _, upd = apply(params, stats, x[i::3])
        stats = upd["batch_stats"]

    def perturb(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if "bn" not in str(path[0]) or name not in ("scale", "bias"):
            return leaf
        vals = rng.normal(size=leaf.shape).astype(np.float32)
        vals[: max(1, leaf.shape[0] // 4)] = 0.0  # gamma = 0 or beta = 0 on some channels
        if name == "scale":
            vals[-1] = -0.0
        return jnp.asarray(vals)

    params = jax.tree_util.tree_map_with_path(perturb, params)
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("bnn_mlp", dict(widths=(32, 32))),
        # IR-Net style: EDE sign after hardtanh, and a binarized classifier input.
        pytest.param(
            "cnn_small",
            dict(widths=(8, 8, 16, 16), input_quantizer="ede_sign", activation="hardtanh", last_layer_float=False),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_binary_bn_folding_keeps_logits_exactly(name, overrides):
    shape = SMALL[name][0]
    model = models.create(name, **overrides)
    x = jax.random.normal(jax.random.key(2), (48, *shape)) * 2
    variables = _trained_like(model, x, np.random.default_rng(0))
    folded, folded_vars = transforms.fold_binary_bn(model, variables, shape)
    paths = transforms.binary_bn_paths(folded, shape)
    n_bn = len([k for k in variables["params"] if "bn" in k])
    assert len(paths) == n_bn - (1 if model.last_layer_float else 0)  # not the BN feeding a float classifier
    for path in paths:
        assert set(folded_vars["params"][path[0]]) == {"threshold", "sign"}
        assert path[0] not in folded_vars.get("batch_stats", {})
    ref = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    out = jax.jit(lambda v, x: folded.apply(v, x, train=False))(folded_vars, x)
    np.testing.assert_array_equal(out, ref)


def test_binary_bn_folding_refuses_sign_changing_activations_and_training():
    model = models.create("cnn_small", activation="relu")
    with pytest.raises(ValueError, match="keeps the sign"):
        transforms.fold_binary_bn(model, {}, (28, 28, 1))
    folded = models.create("cnn_small", binary_bn=True)
    with pytest.raises(ValueError, match="inference"):
        jax.eval_shape(lambda x: folded.init(KEY, x, train=True), jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
