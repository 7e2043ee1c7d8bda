"""Packed model export: the file, and packed inference against the training graph in eval mode.

Every registry model (``binax.models.names()``, so new models are covered) is exported at
a small width with BatchNorm statistics calibrated on real Fashion-MNIST test images and
then perturbed (random γ signs, shifted means, scaled variances), so that the BN → sign
thresholds fall inside the accumulator range. Packed inference must give the same
predictions and the same logits (up to float rounding) as
``model.apply(variables, x, train=False, progress=1.0)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import zipfile

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import binax
import binax.data
import binax.export as bx
from binax import layers as L
from binax.errors import ConfigError, PackedFileError
from binax.export import inference as inf
from binax.export.preprocessing import as_preprocessing
from binax.packed import bits as packing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare_logits(ref, got):
    """The export command's artifact check (experiments.export.compare_logits)."""
    from experiments.export import compare_logits as compare

    return compare(ref, got)


# ------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def float32_reference_graph(monkeypatch):
    """The reference is the training graph with float32 XLA convolutions: ``binax.ops``
    would run its ±1 × ±α layers through XNOR-popcount on CPU (the same values, tested
    in tests/test_ops.py), which costs about 2.5× more compilation here."""
    import binax.ops.binary

    monkeypatch.setattr(binax.ops.binary, "default_impl", lambda backend=None: "xla")


@functools.lru_cache(maxsize=None)
def fashion(n: int = 8) -> np.ndarray:
    """``n`` Fashion-MNIST test images in [−0.5, 0.5], (n, 28, 28, 1) float32."""
    images, _ = binax.data.load_arrays("fashion_mnist", "test")
    return images[:n].astype(np.float32) / 255.0 - 0.5


def images_for(shape, n: int = 8) -> np.ndarray:
    """Fashion-MNIST images at ``shape``: upscaled ×2 for 56+ pixels, zero-padded, tiled to C."""
    h, w, c = shape
    im = fashion(n)
    if h >= 56:
        im = np.repeat(np.repeat(im, 2, axis=1), 2, axis=2)
    top, left = (h - im.shape[1]) // 2, (w - im.shape[2]) // 2
    im = np.pad(im, ((0, 0), (top, h - im.shape[1] - top), (left, w - im.shape[2] - left), (0, 0)))
    return np.tile(im, (1, 1, 1, c))


def input_shape_for(model) -> tuple[int, int, int]:
    """Fashion-MNIST's 28×28×1 where the model takes it, else 32×32×3, else 64×64×3."""
    need = getattr(model, "min_input_size", 1)
    if need <= 4:
        return (28, 28, 1)
    return (32, 32, 3) if need <= 32 else (64, 64, 3)


def small_config(name: str) -> dict:
    """Small widths (and one block per ResNet stage) to keep compilation short."""
    defaults = binax.models.get_config(name)
    cfg = {"width_multiplier": 0.1}
    if name == "bnn_mlp":
        cfg = {"widths": (72, 40, 36)}  # not multiples of 32: the words' padding bits count
    if "stage_sizes" in defaults:
        cfg["stage_sizes"] = (1,) * len(defaults.stage_sizes)
    if defaults.num_classes != 10:
        cfg["num_classes"] = 10
    return cfg


def random_params(abstract, rng) -> dict:
    """Random parameters by name (no jitted init: XLA compiles the RNG slowly on CPU)."""

    def leaf(path, s):
        name = path[-1].key
        shape = s.shape
        if name == "latent_kernel":
            return rng.standard_normal(shape)
        if name == "kernel":  # float layers: unit-variance outputs
            return rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        if name == "scale":  # BatchNorm γ: a quarter negative (flipped thresholds)
            return rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < 0.25, -1.0, 1.0)
        if name in ("bias", "shift", "shift_in", "shift_out"):
            return 0.2 * rng.standard_normal(shape)
        if name == "slope":
            return rng.uniform(0.0, 0.5, shape)
        if name == "shifts":  # ABC-Net v_n: thresholds 0.5 − v_n spread over [−1, 1]
            return 0.5 - np.linspace(-1.0, 1.0, shape[0]) + 0.05 * rng.standard_normal(shape)
        if name == "betas":
            return rng.uniform(0.2, 0.6, shape)
        raise AssertionError(f"no random rule for parameter {name!r}")

    return jax.tree_util.tree_map_with_path(lambda p, s: leaf(p, s).astype(np.float32), abstract)


def _observed_eval(model):
    """Jitted ``model.apply(v, x, train=False, progress=1.0)`` that also returns every
    BatchNorm input's per-channel mean and variance (observed, not changed)."""

    def fn(variables, x):
        seen = {}

        def observe(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                y = args[0]
                axes = tuple(range(y.ndim - 1))
                seen[tuple(context.module.path)] = (jnp.mean(y, axes), jnp.var(y, axes))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(observe):
            logits = model.apply(variables, x, train=False, progress=1.0)
        return logits, seen

    return jax.jit(fn)


def calibrated(model, x: np.ndarray, seed: int = 0, adjust_params=None):
    """(variables, eval-mode logits of ``x``, the jitted eval): random weights, BatchNorm
    statistics of ``x``.

    Each BatchNorm gets the mean and variance of its input on ``x`` in eval mode (one
    pass per BatchNorm in depth order, all with one compilation), then perturbed: means
    shifted, variances scaled by 0.5..2, so that thresholds are not at the batch median.
    """
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params = random_params(abstract["params"], rng)
    if adjust_params is not None:
        params = adjust_params(params)
    stats = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract.get("batch_stats", {}))
    stats = jax.tree_util.tree_map_with_path(lambda p, a: a + (p[-1].key == "var"), stats)
    fn = _observed_eval(model)
    paths = [tuple(k.key for k in p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(stats)[0]]
    for _ in range(len(set(paths)) + 1):
        _, seen = fn({"params": params, "batch_stats": stats}, x)
        for path, (mean, var) in seen.items():
            node = stats
            for k in path:
                node = node[k]
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var) + 1e-3
    for path in set(paths):
        node = stats
        for k in path:
            node = node[k]
        std = np.sqrt(node["var"])
        node["mean"] = (node["mean"] + 0.25 * std * rng.standard_normal(std.shape)).astype(np.float32)
        node["var"] = (node["var"] * rng.uniform(0.5, 2.0, std.shape)).astype(np.float32)
    variables = {"params": params, "batch_stats": stats}
    logits, _ = fn(variables, x)
    return variables, np.asarray(logits), fn


def assert_same_logits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert np.ptp(want, axis=0).max() > 0  # the images give different logits: not trivial


def assert_loads_back(packed, directory) -> None:
    """The saved file passes every check of ``load`` (arrays by key, dtype and shape for
    this layout) and holds the same record and arrays; no inference is compiled here."""
    path = os.path.join(str(directory), "roundtrip.npz")
    packed.save(path)
    loaded = bx.load(path)
    assert loaded.meta == packed.meta and loaded.runtime == packed.runtime
    want = packed.arrays()
    assert sorted(loaded.arrays()) == sorted(want)
    for key, arr in loaded.arrays().items():
        np.testing.assert_array_equal(arr, want[key], err_msg=key)


@functools.lru_cache(maxsize=None)
def _exported(name: str, cfg_json: str, runtime: str, ref_json: str | None):
    cfg = json.loads(cfg_json)
    ref_model = binax.models.create(name, **(json.loads(ref_json) if ref_json else cfg))
    shape = input_shape_for(ref_model)
    x = images_for(shape)
    variables, ref, _ = calibrated(ref_model, x)
    packed = bx.export(binax.models.create(name, **cfg), variables, preprocessing=None, input_shape=shape, runtime=runtime)
    return packed, ref, x


def exported(name: str, cfg: dict, runtime: str = "auto", ref_cfg: dict | None = None):
    """(packed model, reference eval-mode logits, images) for ``name`` with ``cfg``
    (cached: tests that look at the same export share it).

    ``ref_cfg``: the config of the reference graph when it differs (tanh_sign -> sign).
    """
    # JSON text as the cache key: hashable, and nested keyword dicts come back as dicts.
    return _exported(name, json.dumps(cfg, sort_keys=True), runtime,
                     json.dumps(ref_cfg, sort_keys=True) if ref_cfg else None)


# ------------------------------------------------------------------------- every model


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith(("resnet", "reactnet", "vgg_small")) else n for n in binax.models.names()],
)
def test_every_registry_model_matches_its_eval_graph(name, tmp_path):
    packed, ref, x = exported(name, small_config(name))
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert any(layer.packed for layer in packed.layers.values()), packed.report()
    # Binary layers with sign-like inputs all run on XOR-popcount.
    assert "float (kernel unpacked" not in packed.report()


# ------------------------------------------------------------------------- quantizer families


MLP = {"widths": (72, 40, 36)}
CNN = {"width_multiplier": 0.1}


@pytest.mark.parametrize(
    "name,cfg",
    [
        ("bnn_mlp", {**MLP, "input_quantizer": "approx_sign", "kernel_quantizer": "xnor_weight"}),
        ("bnn_mlp", {**MLP, "input_quantizer": "ede_sign", "kernel_quantizer": "libra_pb"}),
        ("bnn_mlp", {**MLP, "input_quantizer": "duo_binary", "kernel_quantizer": "duo_weight"}),
        ("bnn_mlp", {**MLP, "input_quantizer": "ste_heaviside", "kernel_quantizer": "xnor_weight"}),
        ("bnn_mlp", {**MLP, "input_quantizer": "dorefa", "input_quantizer_kwargs": {"k_bit": 2}}),
        ("bnn_mlp", {**MLP, "input_quantizer": "ste_tern"}),
        ("bnn_mlp", {**MLP, "first_layer_float": False, "last_layer_float": False}),
        ("bnn_mlp", {**MLP, "layer_type": "abc", "abc_m": 2, "abc_n": 3}),
        ("bnn_mlp", {**MLP, "layer_type": "abc", "abc_m": 3, "abc_n": 2, "runtime": "generic"}),
        # A binary classifier reads the flattened map through VGG's 'none' classifier_act.
        ("cnn_small", {**CNN, "last_layer_float": False}),
    ],
    ids=[
        "xnor", "irnet", "duo_binary", "heaviside", "dorefa2", "ste_tern_act", "all_binary", "abc_chain", "abc_generic",
        "cnn_binary_classifier",
    ],
)
def test_quantizer_families_match_their_eval_graph(name, cfg, tmp_path):
    cfg = dict(cfg)
    runtime = cfg.pop("runtime", "auto")
    packed, ref, x = exported(name, cfg, runtime=runtime)
    assert packed.runtime == ("chain" if runtime == "auto" else runtime)  # both have a chain plan
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert all(layer.packed for layer in packed.layers.values() if layer.kind != "float_input"), packed.report()


def test_binaryduos_decoupled_network_exports_on_the_generic_runtime(tmp_path):
    # The decoupled network copies each coupled layer's outputs (replicate=2), which the
    # chain plan does not model: export must still pack it and give its eval logits.
    packed, ref, x = exported("bnn_mlp", {**MLP, "input_quantizer": "duo_binary", "replicate": 2})
    assert packed.runtime == "generic"
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert all(layer.packed for layer in packed.layers.values() if layer.kind != "float_input"), packed.report()


def test_tanh_sign_is_exported_as_sign(tmp_path):
    """Self-Binarizing inference: the packed model equals the same network with sign."""
    tanh = {**MLP, "input_quantizer": "tanh_sign", "kernel_quantizer": "tanh_sign"}
    sign = {**MLP, "input_quantizer": "sign", "kernel_quantizer": "sign"}
    packed, ref, x = exported("bnn_mlp", tanh, ref_cfg=sign)
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert binax.models.inference_overrides(tanh)["input_quantizer"] == "sign"
    assert packed.config["input_quantizer"] == "tanh_sign"  # the file keeps the training config
    assert "xor-popcount (sign" in packed.report()


def test_two_plane_thresholds_and_unfused_blocks_are_reported(tmp_path):
    packed, ref, x = exported("vgg7_tiny", small_config("vgg7_tiny"))
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    th = packed.arrays()["thresholds/bn2/threshold"]
    assert th.shape[0] == 2  # duo_ternary: two planes, x >= 0.25 and x >= 0.75 after BN
    report = packed.report()
    assert "fused: int32 of conv1 >= threshold" in report
    assert "feeds a float layer" in report  # fc_bn1 -> relu -> float classifier


def test_non_monotone_block_is_computed_in_float(tmp_path):
    """RPReLU with a negative slope: sign(BN -> RPReLU) is not a threshold; the chain
    decodes to float there and stays exact."""
    cfg = {"widths": (72, 40, 36, 34), "activation": "rprelu"}  # bn1, bn2 sit between binary layers
    model = binax.models.create("bnn_mlp", **cfg)
    shape = input_shape_for(model)
    x = images_for(shape)
    variables, _, fn = calibrated(model, x)
    variables["params"]["bn1_act"]["slope"][0] = -0.5
    ref = np.asarray(fn(variables, x)[0])
    packed = bx.export(model, variables, preprocessing=None, input_shape=shape)
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert "thresholds/bn1/threshold" not in packed.arrays()
    assert "thresholds/bn2/threshold" in packed.arrays()
    assert "not monotone" in packed.report()


def test_unsupported_kernel_quantizer_falls_back_to_float_and_says_so(tmp_path):
    cfg = {**MLP, "kernel_quantizer": "ste_tern"}
    packed, ref, x = exported("bnn_mlp", cfg)
    assert_same_logits(packed(x), ref)
    assert_loads_back(packed, tmp_path)
    assert {layer.kind for layer in packed.layers.values()} == {"float"}
    assert "kernel quantizer 'ste_tern' is not ±α per channel" in packed.report()


# ------------------------------------------------------------------------- one layer, exactly


CODES = [
    ("ste_sign", {}),
    ("ste_heaviside", {}),
    ("duo_binary", {}),
    ("duo_ternary", {}),
    ("ste_tern", {}),
    ("dorefa", {"k_bit": 2}),
]


def test_activation_codes_reconstruct_the_quantizer():
    """q(x) = low + Δ·Σ_p plane_p(x), and pad values map to their planes."""
    x = np.concatenate([np.linspace(-1.5, 1.5, 301), [0.0, 0.25, 0.5, 0.75, 1.0, -0.05, 0.05]]).astype(np.float32)
    for spec, kw in CODES + [("tanh_sign", {})]:
        code = inf.activation_code(spec, kw)
        q = code.quantize(jnp.asarray(x))
        planes = np.asarray(code.plane_bits(jnp.asarray(x)))
        np.testing.assert_allclose(code.low + code.step * planes.sum(0), q, atol=1e-6, err_msg=spec)
        assert float(code.offset) == 2 * code.low / code.step + code.planes
        top = code.pad_planes(code.low + code.step * code.planes)
        assert top == (1,) * code.planes
    assert inf.activation_code("ste_sign").pad_planes(0.0) == (0,)
    assert inf.activation_code("duo_ternary").pad_planes(0.5) == (1, -1)
    assert inf.activation_code("duo_ternary").pad_planes(0.3) is None
    assert inf.activation_code("dorefa", {"k_bit": 3}) is not None
    assert inf.activation_code(lambda x: x) is None


def _layer_cases():
    """(layer, input shape, expected kind): every activation code on a conv (and two on a
    dense) layer with sign kernels, the other kernel quantizers, the padding modes, ABC-Net,
    and the layers that keep packed weights but compute in float."""
    cases = []
    for spec, kw in CODES:
        q = {"input_quantizer": spec, "input_quantizer_kwargs": kw, "kernel_quantizer": "ste_sign"}
        cases.append((L.BinaryConv(5, (3, 3), **q), (2, 6, 5, 35), "xnor"))
        if spec in ("ste_sign", "duo_ternary"):
            cases.append((L.BinaryDense(37, **q), (3, 70), "xnor"))
    sign = {"input_quantizer": "ste_sign", "kernel_quantizer": "ste_sign"}
    cases += [
        (L.BinaryDense(9, input_quantizer="duo_ternary", kernel_quantizer="xnor_weight"), (3, 40), "xnor"),
        (L.BinaryConv(6, (3, 3), input_quantizer="ede_sign", kernel_quantizer="libra_pb"), (2, 5, 5, 20), "xnor"),
        (L.BinaryConv(6, (3, 3), input_quantizer="duo_binary", kernel_quantizer="duo_weight"), (2, 5, 5, 20), "xnor"),
        (L.BinaryConv(4, (3, 3), strides=2, padding=((1, 2), (0, 1)), pad_values=-1.0, **sign), (2, 7, 6, 33), "xnor"),
        (L.BinaryConv(4, (3, 2), padding="SAME", pad_values=0.0, use_bias=True, **sign), (2, 5, 5, 3), "xnor"),
        (L.BinaryConv(4, (2, 2), padding="VALID", **sign), (1, 4, 4, 64), "xnor"),
        (L.ABCConv(6, (3, 3), m=3, n=2), (2, 5, 5, 7), "abc"),
        (L.ABCDense(6, m=2, n=3, use_bias=True), (4, 40), "abc"),
        (L.BinaryDepthwiseConv((3, 3), depth_multiplier=2, **sign), (2, 5, 5, 3), "float_input"),
        (L.BinaryConv(4, (3, 3), kernel_dilation=2, **sign), (2, 7, 7, 5), "float_input"),
        (L.BinaryConv(4, (3, 3), input_quantizer=None, kernel_quantizer="xnor_weight"), (2, 5, 5, 3), "float_input"),
        (L.ABCConv(5, (3, 3), m=2, n=2, pad_values=0.5), (2, 5, 5, 4), "float_input"),
    ]
    return cases


@pytest.mark.slow
def test_packed_layers_equal_the_layers_eval_forward():
    """decode(accumulate(encode(x))) against the layer itself, for every code, kernel
    quantizer and padding mode; exact where the layer's scale is a power of two."""
    rng = np.random.default_rng(0)
    cases = []
    kinds = []
    for module, shape, kind in _layer_cases():
        kinds.append(kind)
        x = rng.standard_normal(shape).astype(np.float32)
        x.flat[::7] = 0.0  # exact zeros: sign(0) = +1, heaviside(0) = 0
        params = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)["params"]
        params = random_params(params, rng)
        cases.append((module, params, x))
    requests = {i: inf.kernel_request(m, p) for i, (m, p, _) in enumerate(cases)}
    quantized = inf.quantize_kernels(requests)  # one compilation for all the layers
    for i, (module, params, x) in enumerate(cases):
        export = inf.export_layer(module, params, quantized=quantized[i])
        assert export.kind == kinds[i], (module, export.kind, export.note)
        layer = inf.PackedLayer(("l",), module, export.kind, export.info)
        arrays = {**export.arrays, **inf.derived_arrays(export)}
        cases[i] = (module, params, x, layer, arrays)

    @jax.jit
    def run(all_params, xs, all_arrays):
        out = []
        for (module, _, _, layer, _), p, x, a in zip(cases, all_params, xs, all_arrays):
            ref = module.apply({"params": p}, x)
            if layer.packed:
                out.append((ref, layer.decode(a, layer.accumulate(a, layer.encode(a, x)))))
            else:
                out.append((ref, layer.float_apply(a, x)))
        return out

    results = run([c[1] for c in cases], [c[2] for c in cases], [c[4] for c in cases])
    for (module, _, _, layer, _), (ref, got) in zip(cases, results):
        # Power-of-two scales (sign, Libra-PB) and levels (all but DoReFa's thirds): exact.
        kq, iq = getattr(module, "kernel_quantizer", None), getattr(module, "input_quantizer", None)
        if kq in ("ste_sign", "libra_pb") and iq != "dorefa":
            np.testing.assert_array_equal(got, ref, err_msg=repr(module))
        else:
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * float(np.abs(ref).max()), err_msg=repr(module))


# ------------------------------------------------------------------------- the file


def test_file_round_trip_is_one_npz_without_latent_weights(tmp_path):
    packed, ref, x = exported("bnn_mlp", MLP)
    path = tmp_path / "mlp.npz"
    size = packed.save(path)
    assert size == os.path.getsize(path) and sorted(os.listdir(tmp_path)) == ["mlp.npz"]
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert not any("latent" in n for n in names)
    meta = json.loads(str(np.load(path)["meta"]))
    assert meta["format_version"] == bx.FORMAT_VERSION == 3 and meta["model"] == "bnn_mlp"
    assert meta["model_class"] == "MLP" and "module" not in meta  # a class name as text, no import path
    assert meta["config"]["widths"] == list(MLP["widths"]) and meta["input_shape"] == [28, 28, 1]
    assert meta["preprocessing"]["normalize"] is None  # exported with preprocessing=None
    loaded = bx.load(path)
    np.testing.assert_array_equal(loaded(x), packed(x))
    assert loaded.report() == packed.report()
    # A path without the suffix is written as given (np.savez would append '.npz').
    assert bx.save(loaded, tmp_path / "plain") == os.path.getsize(tmp_path / "plain")


def test_the_file_records_the_layer_order_and_the_chain_steps():
    packed, _, _ = exported("vgg7_tiny", small_config("vgg7_tiny"))
    meta = packed.meta
    model = binax.models.create("vgg7_tiny", **small_config("vgg7_tiny"))
    calls, _ = binax.models.trace(model, (32, 32, 3))
    order = []
    for c in calls:
        if c.path and "/".join(c.path) not in order:
            order.append("/".join(c.path))
    assert [e["path"] for e in meta["layer_order"]] == order
    chain = meta["chain"]
    assert [s["op"] for s in chain] == [op.kind for op in model.chain()]
    assert [s.get("path") for s in chain] == ["/".join(op.path) or None for op in model.chain()]
    for step in chain:
        if step["op"] == "block":
            assert step["fused"] == (f"thresholds/{step['path']}/threshold" in packed.arrays())
            assert step["epsilon"] == model.bn_epsilon and step["activation"] == model.activation
        if step["op"] == "layer":
            want = packed.layers[(step["path"],)].kind if (step["path"],) in packed.layers else "float"
            assert step["compute"] == want
        if step["op"] == "max_pool":
            assert step["window"] == [2, 2] and step["strides"] == [2, 2]


def test_binary_kernels_are_stored_one_bit_per_weight():
    """Each popcount layer stores ceil(C/32) words per (tap, output) and one float per
    output channel; the float32 latent kernel is gone."""
    packed, _, _ = exported("vgg_small", small_config("vgg_small"))
    arrays = packed.arrays()
    model = binax.models.create("vgg_small", **small_config("vgg_small"))
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, 32, 32, 3)))["params"]
    for path, layer in packed.layers.items():
        assert layer.kind == "xnor"
        kh, kw, c, o = abstract[path[0]]["latent_kernel"].shape
        bits = arrays["layers/" + "/".join(path) + "/bits"]
        assert bits.dtype == np.uint32 and bits.shape == (kh, kw, packing.num_words(c), o)
        # The scale is stored where the layer decodes to float; elsewhere it is in the thresholds.
        alpha = arrays.get("layers/" + "/".join(path) + "/alpha")
        assert (alpha is None) == bool(layer.info.get("scale_in_thresholds")), path
        assert alpha is None or alpha.shape == (o,)
    assert packed.layers[("conv5",)].info.get("scale_in_thresholds") is None  # -> float classifier
    # BatchNorms between binary layers are stored as thresholds only.
    assert not any(k.startswith(("variables/params/bn1/", "variables/batch_stats/bn1/")) for k in arrays)
    assert sorted(k for k in arrays if k.startswith("thresholds/")) == [
        f"thresholds/bn{i}/{n}" for i in range(1, 5) for n in ("flip", "threshold")
    ]


def test_loading_needs_neither_binax_train_nor_latent_weights(tmp_path):
    packed, ref, x = exported("bnn_mlp", MLP)
    packed.save(tmp_path / "m.npz")
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np\n"
        "from binax.export import load\n"
        f"m = load({str(tmp_path / 'm.npz')!r})\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(m(np.load({str(tmp_path / 'x.npy')!r}))))\n"
        "assert 'binax.train' not in sys.modules, sorted(k for k in sys.modules if k.startswith('binax'))\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=300)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), packed(x))


def test_bad_inputs_raise_clear_errors(tmp_path):
    packed, _, x = exported("bnn_mlp", MLP)
    with pytest.raises(ConfigError, match=r"exported for inputs of shape \(N, 28, 28, 1\)"):
        packed(x[:, :27])
    model = binax.models.create("bnn_mlp", **MLP)
    variables = {"params": {}, "batch_stats": {}}
    shape = {"preprocessing": None, "input_shape": (28, 28, 1)}
    with pytest.raises(ConfigError, match="runtime must be one of"):
        bx.export(model, variables, **shape, runtime="fast")
    with pytest.raises(ConfigError, match="export takes the Flax module"):
        bx.export("bnn_mlp", variables, **shape)
    with pytest.raises(ConfigError, match="input_shape must be a tuple"):
        bx.export(model, variables, preprocessing=None, input_shape=28)
    with pytest.raises(ConfigError, match="the input shape is unknown"):
        bx.export(model, variables, preprocessing=None)
    with pytest.raises(ConfigError, match="is not a registered quantizer; a packed model file names quantizers by registry"):
        bx.export(model.clone(input_quantizer=lambda v: v), variables, **shape)
    with pytest.raises(ConfigError, match="variables lack"):
        bx.export(model, variables, **shape)
    with pytest.raises(ConfigError, match="no packed-chain plan"):
        bx.export(binax.models.create("resnet20"), variables, preprocessing=None, input_shape=(32, 32, 3), runtime="chain")
    path = tmp_path / "old.npz"
    meta = {**packed.meta, "format_version": bx.FORMAT_VERSION + 1}
    np.savez(path, meta=np.asarray(json.dumps(meta)), **packed.arrays())
    with pytest.raises(PackedFileError, match="format version"):
        bx.load(path)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(PackedFileError, match="not a binax packed model file"):
        bx.load(tmp_path / "other.npz")


class WiderMLP(binax.models.mlp.MLP):
    """A model class of the user's own (not in the registry): recorded by class and fields."""


def test_export_takes_the_module_and_records_how_to_rebuild_it(tmp_path):
    from binax.export.model import module_identity

    name, where, config, _ = module_identity(binax.models.create("vgg7_tiny", width_multiplier=0.5))
    assert (name, where, config["width_multiplier"]) == ("vgg7_tiny", "VGG", 0.5)
    assert module_identity(binax.models.create("cnn_small"))[0] == "cnn_small"  # the same class as vgg_small
    base = binax.models.create("bnn_mlp", **MLP)
    mine = WiderMLP(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name not in ("parent", "name")})
    name, where, config, _ = module_identity(mine)
    assert name is None and where == "WiderMLP" and config["widths"] == list(MLP["widths"])
    x = images_for((28, 28, 1))
    variables, ref, _ = calibrated(mine, x)
    packed = bx.export(mine, variables, preprocessing=None, input_shape=(28, 28, 1))
    assert_same_logits(packed(x), ref)
    packed.save(tmp_path / "mine.npz")
    # The file names the class as text only: loading runs the module the caller passes.
    with pytest.raises(PackedFileError, match=r"mine.npz: its model is a class of your own \(WiderMLP\).*load\(path, model=\.\.\.\)"):
        bx.load(tmp_path / "mine.npz")
    with pytest.raises(PackedFileError, match=r"config keys that differ: \['widths'\]"):
        bx.load(tmp_path / "mine.npz", model=mine.clone(widths=(72, 40, 37)))
    loaded = bx.load(tmp_path / "mine.npz", model=mine)
    assert type(loaded.model) is WiderMLP and loaded.name == "WiderMLP"
    np.testing.assert_array_equal(loaded(x), packed(x))


# ------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "dataset, mode",
    [("fashion_mnist", "mean_std"), ("fashion_mnist", "unit"), ("cifar10", "mean_std"), ("cifar10", "sym"), ("digits", "mean_std")],
)
def test_the_preprocessing_table_is_the_training_pipelines_normalization(dataset, mode):
    pre = bx.Preprocessing.for_dataset(dataset, mode)
    spec = binax.data.get_spec(dataset)
    assert pre.shape == spec.image_shape and pre.max_value == spec.max_value and pre.normalize == mode
    c = spec.image_shape[-1]
    raw = np.random.default_rng(0).integers(0, spec.max_value + 1, (4, 6, 5, c)).astype(np.uint8)
    table = pre.table(c)
    assert table.shape == (c, spec.max_value + 1) and table.dtype == np.float32
    np.testing.assert_array_equal(table[np.arange(c), raw], binax.data.normalize(raw.astype(np.float32), spec, mode))
    assert bx.Preprocessing.from_json(json.loads(json.dumps(pre.to_json()))) == pre


def test_preprocessing_from_a_training_config_and_its_errors():
    from configs import common as config_common

    config = config_common.base_config()
    config.data.name, config.data.normalize = "cifar10", "unit"
    pre = bx.Preprocessing.from_config(config)
    assert (pre.dataset, pre.normalize, pre.shape, pre.mean) == ("cifar10", "unit", (32, 32, 3), None)
    assert bx.Preprocessing.for_dataset("imagenet2012").resize.startswith("evaluation images: the central square")
    with pytest.raises(ConfigError, match="unknown dataset"):
        bx.Preprocessing.for_dataset("svhn")
    with pytest.raises(ConfigError, match="normalize='cube' is not one of"):
        bx.Preprocessing.for_dataset("mnist", "cube")
    with pytest.raises(ConfigError, match=r"input_shape \(32, 32, 3\) differs from the preprocessing's image shape \(28, 28, 1\)"):
        as_preprocessing("fashion_mnist", (32, 32, 3))
    with pytest.raises(ConfigError, match="preprocessing must be a binax.export.Preprocessing"):
        as_preprocessing({"normalize": "unit"}, None)


@functools.lru_cache(maxsize=None)
def raw_exported(dataset: str = "fashion_mnist", n: int = 8):
    """(packed bnn_mlp exported with the dataset's preprocessing, eval-mode logits of the
    normalized images, the raw uint8 images)."""
    pre = bx.Preprocessing.for_dataset(dataset)
    spec = binax.data.get_spec(dataset)
    if dataset == "fashion_mnist":
        raw = binax.data.load_arrays(dataset, "test")[0][:n]
    else:
        raw = np.random.default_rng(0).integers(0, spec.max_value + 1, (n, *spec.image_shape)).astype(np.uint8)
    model = binax.models.create("bnn_mlp", **MLP)
    variables, ref, _ = calibrated(model, binax.data.normalize(raw.astype(np.float32), spec, "mean_std"))
    return bx.export(model, variables, preprocessing=pre), ref, raw


def test_raw_images_are_preprocessed_exactly_as_in_training():
    packed, ref, raw = raw_exported()
    assert raw.dtype == np.uint8
    meta = packed.meta["preprocessing"]
    assert meta == {
        "normalize": "mean_std", "shape": [28, 28, 1], "max_value": 255, "mean": [0.286], "std": [0.353],
        "dataset": "fashion_mnist", "resize": None, "raw_dtype": "uint8",
    }
    spec = binax.data.get_spec("fashion_mnist")
    inputs = packed.preprocess(raw)
    np.testing.assert_array_equal(inputs, binax.data.normalize(raw.astype(np.float32), spec, "mean_std"))
    logits = np.asarray(packed(raw))
    np.testing.assert_array_equal(logits, packed.forward(inputs))
    assert_same_logits(logits, ref)
    np.testing.assert_array_equal(packed(raw.astype(np.int64)), logits)  # any integer dtype in range


def test_the_wrong_kind_of_input_is_an_error_never_a_wrong_answer():
    packed, _, raw = raw_exported()
    unit = raw.astype(np.float32) / 255.0
    with pytest.raises(ConfigError, match=r"takes raw images: integers in \[0, 255\] \(uint8\).*got float32"):
        packed(unit)  # [0, 1] floats
    with pytest.raises(ConfigError, match="got float32"):
        packed(raw.astype(np.float32))  # raw pixels as floats
    with pytest.raises(ConfigError, match=r"the input value 0 \(channel 0\) is not one of the 256 values"):
        packed.forward(unit)  # [0, 1] floats declared as preprocessed: not mean/std values
    with pytest.raises(ConfigError, match=r"which lie in \[-0.8102, 2.023\] \(channel 0\); got values in \[0, 255\]"):
        packed.forward(raw.astype(np.float32))
    with pytest.raises(ConfigError, match=r"forward takes float inputs.*got uint8 values"):
        packed.forward(raw)
    with pytest.raises(ConfigError, match=r"raw pixel values must lie in \[0, 255\].*got values in \[-1, 255\]"):
        packed(raw.astype(np.int32) - (raw == 0))
    digits, _, digits_raw = raw_exported("digits")
    with pytest.raises(ConfigError, match=r"must lie in \[0, 16\] .*\(digits\); got values in \[1, 17\]"):
        digits(np.minimum(digits_raw.astype(np.int32) + 1, 17))
    floats, _, x = exported("bnn_mlp", MLP)  # preprocessing=None: float inputs as given
    with pytest.raises(ConfigError, match=r"forward takes float inputs.*none: float inputs as given.*got uint8"):
        floats(raw)
    with pytest.raises(ConfigError, match="exported without preprocessing"):
        floats.preprocess(raw)


# ------------------------------------------------------------------------- jax.export artifact


PORTABLE_RUNNER = """
import sys, numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[1], "rb").read())
for path in sys.argv[2:]:
    np.save(path + ".out.npy", np.asarray(exported.call(np.load(path))))
assert not [m for m in sys.modules if m.split(".")[0] == "binax"], "the artifact must not need binax"
print(exported.in_avals, exported.out_avals)
"""


@pytest.mark.slow
def test_the_jax_export_artifact_runs_without_binax_and_agrees_with_the_runtime(tmp_path):
    """Chain (raw uint8 in) and generic (float in) runtimes; two batch sizes; a process
    that never imports binax."""
    raw_model, _, raw = raw_exported()
    generic, _, x = exported("bnn_mlp", {**MLP, "layer_type": "abc", "abc_m": 3, "abc_n": 2}, runtime="generic")
    digits, _, digits_raw = raw_exported("digits")
    digits_raw = digits_raw.copy()
    digits_raw[1, 0, 0, 0] = 17  # past max_value: the artifact cannot raise, it gives NaN
    cases = {"raw": (raw_model, raw), "generic": (generic, x), "digits": (digits, digits_raw)}
    for name, (model, inputs) in cases.items():
        size = model.save_portable(tmp_path / f"{name}.jaxexport")
        assert size == os.path.getsize(tmp_path / f"{name}.jaxexport")
        np.save(tmp_path / f"{name}_all.npy", inputs)
        np.save(tmp_path / f"{name}_3.npy", inputs[:3])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [sys.executable, "-c", PORTABLE_RUNNER, str(tmp_path / f"{name}.jaxexport"),
             str(tmp_path / f"{name}_all.npy"), str(tmp_path / f"{name}_3.npy")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        want_dtype = "uint8" if model.preprocessing.takes_raw else "float32"
        assert f"{want_dtype}[batch," in out.stdout
        if name == "digits":
            got = np.load(tmp_path / "digits_all.npy.out.npy")
            assert np.isnan(got[1]).all() and not np.isnan(np.delete(got, 1, 0)).any()
            ok = digits_raw.copy()
            ok[1, 0, 0, 0] = 16
            np.testing.assert_array_equal(np.delete(got, 1, 0), np.delete(np.asarray(model(ok)), 1, 0))
            continue
        for tag, batch in (("all", inputs), ("3", inputs[:3])):
            # XLA compiles the deserialized module by itself: predictions identical, logits
            # within the export command's stated tolerance (not bit for bit).
            ok, text = compare_logits(np.asarray(model(batch)), np.load(tmp_path / f"{name}_{tag}.npy.out.npy"))
            assert ok, f"{name} {tag}: {text}"
# ------------------------------------------------------------------------- experiments.export


def test_export_command_packs_the_best_checkpoint_of_a_workdir(tmp_path, capsys):
    import optax

    from binax.train import Checkpoints, TrainState
    from configs import common as config_common
    from experiments import export as export_cli

    config = config_common.base_config()
    config.model = config_common.model_config("bnn_mlp", widths=(40, 36))
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    model = binax.models.create("bnn_mlp", widths=(40, 36))
    x = images_for((28, 28, 1))
    good, _, _ = calibrated(model, x, seed=1)
    worse, _, _ = calibrated(model, x, seed=2)

    def state(variables, step):
        return TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            opt_state=optax.sgd(0.1).init(variables["params"]),
            rng=jax.random.PRNGKey(0),
        )

    ckpts = Checkpoints(str(tmp_path / "checkpoints"))
    ckpts.save(10, state(good, 10), accuracy=0.9)
    ckpts.save(20, state(worse, 20), accuracy=0.5)  # the latest, not the best
    ckpts.close()

    out = export_cli.run(str(tmp_path), None, "best", "auto", None, check=4)
    printed = capsys.readouterr().out
    assert out == str(tmp_path / "packed_bnn_mlp.npz") and os.path.exists(out)
    assert os.path.exists(tmp_path / "packed_bnn_mlp.jaxexport")
    assert "checkpoint step 10 (best; eval accuracy 90.00% saved with it)" in printed
    assert "packed file (.npz)" in printed and "Total params" in printed and "predictions agree 100%" in printed
    assert "jax.export artifact vs the packed file: predictions identical on 4 of 4 images" in printed
    assert "within the tolerance" in printed
    # The run's preprocessing (config.data: Fashion-MNIST, mean_std) is in the file.
    loaded = bx.load(out)
    assert loaded.preprocessing == bx.Preprocessing.for_dataset("fashion_mnist", "mean_std")
    direct = bx.export(model, good, preprocessing="fashion_mnist")
    raw = binax.data.load_arrays("fashion_mnist", "test")[0][:8]
    np.testing.assert_array_equal(loaded(raw), direct(raw))
    from binax import train

    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        train.restore_variables(str(tmp_path), "7")
    assert train.restore_variables(str(tmp_path), "latest")[3] == 20
    # --out into folders that do not exist yet: created; the latest step's accuracy named.
    out = export_cli.run(str(tmp_path), str(tmp_path / "new" / "deeper") + "/", "latest", "auto", None, check=0)
    assert out == str(tmp_path / "new" / "deeper" / "packed_bnn_mlp.npz") and os.path.exists(out)
    assert os.path.exists(tmp_path / "new" / "deeper" / "packed_bnn_mlp.jaxexport")
    assert "checkpoint step 20 (latest; eval accuracy 50.00% saved with it)" in capsys.readouterr().out


# ------------------------------------------------------------------------- docs/export.md


def doc_reader() -> str:
    """The numpy reader of docs/export.md (its python block that defines ``predict``)."""
    text = open(os.path.join(ROOT, "docs", "export.md")).read()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def predict(" in b]
    return block


def test_the_docs_numpy_reader_reproduces_the_packed_predictions(tmp_path):
    """The page's reader, run on an exported bnn_mlp (two fused thresholds, float first
    layer, BatchNorms and classifier), against binax's packed runtime."""
    reader = doc_reader()
    assert len(reader.strip().splitlines()) <= 60
    imports = [line for line in reader.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import json", "import numpy as np"]
    namespace: dict = {}
    exec(compile(reader, "docs/export.md", "exec"), namespace)
    # Its binary products are float32 (BLAS; exact for |sum| < 2^24), equal to integer ones.
    words = np.random.default_rng(0).integers(0, 2**32, size=(32, 3), dtype=np.uint32)
    kernel = namespace["unpack"](words, 1000)
    assert kernel.dtype == np.float32 and kernel.shape == (1000, 3) and set(np.unique(kernel)) == {-1.0, 1.0}
    signs = np.where(np.arange(1000) % 7 == 0, -1, 1).astype(np.float32)
    np.testing.assert_array_equal(signs @ kernel, signs.astype(np.int64) @ kernel.astype(np.int64))

    raw = binax.data.load_arrays("fashion_mnist", "test")[0][:200]
    cfg = {"widths": (72, 40, 36, 34)}
    model = binax.models.create("bnn_mlp", **cfg)
    spec = binax.data.get_spec("fashion_mnist")
    variables, _, _ = calibrated(model, binax.data.normalize(raw[:64].astype(np.float32), spec, "mean_std"))
    packed = bx.export(model, variables, preprocessing="fashion_mnist")
    assert sorted(packed.meta["fused"]) == ["bn1", "bn2"]
    packed.save(tmp_path / "mlp.npz")

    got = namespace["predict"](str(tmp_path / "mlp.npz"), raw)
    want = np.asarray(packed(raw))
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert np.ptp(want, axis=0).max() > 0


@pytest.mark.slow
def test_the_docs_python_example_runs_on_a_trained_run(tmp_path):
    """docs/export.md's first example, on the README's digits run (trained here, quick)."""
    text = open(os.path.join(ROOT, "docs", "export.md")).read()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    assert 'restore_variables("runs/digits")' in example
    code = (
        "from binax import train\nfrom configs import digits_mlp\n"
        "train.train_and_evaluate(digits_mlp.get_config('quick'), 'runs/digits')\n" + example
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 1 quantized layers run on XOR-popcount." in out.stdout  # widths (256, 256): fc1
    packed_acc, trained_acc = re.search(r"packed (\S+)%, trained (\S+)%", out.stdout).groups()
    assert packed_acc == trained_acc  # the packed model on raw pixels = the trained model on its inputs
    # The artifact's example, in a process without binax.
    np.save(tmp_path / "raw.npy", binax.data.load_arrays("digits", "test")[0])
    portable = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    assert "jax.export.deserialize" in portable
    code = (
        "import sys\nimport numpy as np\nimages = np.load('raw.npy')\n" + portable
        + "\nassert not [m for m in sys.modules if m.startswith('binax')]\nprint(logits.shape)\n"
    )
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["(ShapedArray(uint8[batch,8,8,1]),) (ShapedArray(float32[batch,10]),)", "(297, 10)"]
