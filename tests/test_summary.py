"""binax.summary: parameters by bit-width, memory, binary/float MACs and binary operations,
by hand; Larq's columns (precision, trainable split) and the pooling/shortcut rows."""

import json
import re

import jax
import jax.numpy as jnp

import pytest

import binax
from binax.errors import ConfigError
from binax import models

VGG = (3, 128, 128, 256, 256, 512, 512)
VGG_CONV_SIDES = (32, 32, 16, 16, 8, 8)  # each conv's output side (pools follow convs 2, 4, 6)


def test_summary_is_callable_at_top_level_and_allocates_nothing():
    model = models.create("resnet18")  # 11M parameters at 224x224: shapes only
    s = binax.summary(model, (224, 224, 3))
    assert s.totals.params > 11_000_000


def test_vgg_small_split_by_hand():
    s = binax.summary(models.create("vgg_small"), (32, 32, 3))
    binary_params = sum(9 * cin * cout for cin, cout in zip(VGG[1:-1], VGG[2:]))
    bn = 4 * sum(VGG[1:])  # scale, bias, mean, var
    float_params = 9 * 3 * 128 + bn + 512 * 4 * 4 * 10 + 10
    binary_macs = sum(side * side * 9 * cin * cout for side, cin, cout in zip(VGG_CONV_SIDES[1:], VGG[1:-1], VGG[2:]))
    float_macs = 32 * 32 * 9 * 3 * 128 + 512 * 4 * 4 * 10

    t = s.totals
    assert (t.binary_params, t.float_params) == (binary_params, float_params)
    assert (t.binary_macs, t.float_macs) == (binary_macs, float_macs)
    assert (s.binary_params, s.float_params, s.binary_macs, s.float_macs) == (
        binary_params,
        float_params,
        binary_macs,
        float_macs,
    )
    assert t.params_by_bits == {1: binary_params, 32: float_params}
    assert (t.trainable_params, t.non_trainable_params) == (binary_params + float_params - bn // 2, bn // 2)
    assert t.binary_ops == binary_macs and t.macs_by_bits == {1: binary_macs, 32: float_macs}
    assert t.memory_bytes == binary_params / 8 + 4 * float_params
    assert t.float32_bytes == 4 * (binary_params + float_params)
    assert t.compression_ratio == pytest.approx(t.float32_bytes / t.memory_bytes)
    assert t.binary_mac_fraction == pytest.approx(binary_macs / (binary_macs + float_macs))

    conv1 = s.layer("conv1")
    assert conv1.output_shape == (32, 32, 128)
    assert (conv1.input_bits, conv1.kernel_bits, conv1.memory_bits) == (1, 1, 9 * 128 * 128)
    assert s.layer("bn1").output_shape == (16, 16, 128)  # pooled before the batch norm
    assert (conv1.kind, s.layer("conv0").kind, s.layer("classifier").kind) == ("BinaryConv", "Conv (float)", "Dense (float)")
    assert (s.layer("conv0").input_bits, s.layer("bn1").input_bits) == (32, None)
    # The pools, in execution order: conv -> max-pool -> BN for convs 1, 3 and 5.
    names = [r.name for r in s.layers]
    for pool, conv, bn in (("max_pool", "conv1", "bn1"), ("max_pool_1", "conv3", "bn3"), ("max_pool_2", "conv5", "bn5")):
        assert s.layer(pool).kind == "MaxPool" and names.index(conv) + 1 == names.index(pool) == names.index(bn) - 1
    assert s.layer("max_pool_2").output_shape == (4, 4, 512)

    table = str(s)
    for text in ("conv5", "classifier", "In bits", "W bits", "1-bit params", "32-bit MACs", "Binary ops",
                 f"{binary_macs:,}", "compression", "Trainable params: ", "non-trainable (batch statistics): 3,584"):
        assert text in table


def test_bireal_resnet18_matches_the_papers_operation_counts():
    # Bi-Real Net (Liu et al. 2018), ResNet-18: 1.68e9 binary ops and 1.63e8 FLOPs, where
    # FLOPs = float MACs + binary/64. Our counts, from the layer shapes:
    s = binax.summary(models.create("resnet18"), (224, 224, 3))
    stage = lambda side, cin, cout, n: side * side * 9 * (cin * cout + (n - 1) * cout * cout)  # noqa: E731
    binary = stage(56, 64, 64, 4) + stage(28, 64, 128, 4) + stage(14, 128, 256, 4) + stage(7, 256, 512, 4)
    downsample = 28 * 28 * 64 * 128 + 14 * 14 * 128 * 256 + 7 * 7 * 256 * 512  # float 1x1 convs
    floats = 112 * 112 * 7 * 7 * 3 * 64 + downsample + 512 * 1000
    assert (s.binary_macs, s.float_macs, s.binary_ops) == (binary, floats, binary)
    assert s.binary_ops == pytest.approx(1.68e9, rel=0.005)
    assert s.float_macs + s.binary_ops / 64 == pytest.approx(1.63e8, rel=0.01)  # 1.638e8 here


def test_resnet18_has_its_pooling_and_shortcut_rows():
    s = binax.summary(models.create("resnet18"), (224, 224, 3))
    kinds = [r.kind for r in s.layers]
    assert kinds.count("Add (shortcut)") == 16  # every unit of 4 stages x 2 blocks x 2 units
    assert kinds.count("AvgPool") == 3  # Bi-Real's downsampling shortcuts: 2x2 pool -> 1x1 conv
    assert kinds.count("MaxPool") == 1 and kinds.count("GlobalAvgPool") == 1
    names = [r.name for r in s.layers]
    assert names[:3] == ["stem_conv", "stem_bn", "max_pool"]
    unit = "stage1_block0_unit0"
    order = ["conv", "bn", "avg_pool", "down_conv", "down_bn", "shortcut_add"]
    assert [n for n in names if n.startswith(unit + "/")] == [f"{unit}/{n}" for n in order]
    assert s.layer(f"{unit}/avg_pool").output_shape == (28, 28, 64)
    assert s.layer(f"{unit}/down_conv").kind == "Conv (float)"
    assert names[-2:] == ["global_avg_pool", "classifier"] and s.layer("global_avg_pool").output_shape == (512,)
    assert all(r.params == 0 and r.macs == 0 for r in s.layers if r.kind in ("MaxPool", "AvgPool", "Add (shortcut)"))


def test_abc_layers_count_m_binary_bases_and_m_times_n_binary_ops_next_to_their_binary_macs():
    m, n = 3, 2
    s = binax.summary(models.create("cnn_small", layer_type="abc", abc_m=m, abc_n=n), (28, 28, 1))
    base = 28 * 28 * 9 * 32 * 32 + 14 * 14 * 9 * 32 * 64 + 14 * 14 * 9 * 64 * 64
    weights = 9 * (32 * 32 + 32 * 64 + 64 * 64)
    assert s.binary_macs == base  # one MAC per weight and output position: not inflated
    assert s.binary_ops == m * n * base  # M weight bases x N activation bases
    assert s.totals.params_by_bits[m] == weights and s.totals.macs_by_bits[1] == base
    assert s.binary_params == 0  # M binary values per weight, stored as M bits
    abc = s.layer("conv1")
    assert abc.kind == "ABCConv (3×2 binary bases)" and abc.bases == (m, n)
    assert abc.memory_bits == m * 9 * 32 * 32 + 32 * 2 * n  # + shifts, betas
    assert (abc.input_bits, abc.kernel_bits, abc.mac_bits) == (n, m, 1)
    # A Larq user reads "3-bit" as an 8-level quantizer: the table says binary bases.
    table = str(s)
    assert not re.search(r"(?<![0-9×])[23]-bit", table), table
    assert "3×1-bit params" in table and "1-bit MACs" in table
    row = next(line for line in table.splitlines() if line.startswith("conv1 "))
    assert row.split()[1:6] == ["ABCConv", "(3×2", "binary", "bases)", "2×1"], row


@pytest.mark.parametrize(
    "overrides",
    [dict(layer_type="abc", abc_m=3, abc_n=3), dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight"),
     dict(input_quantizer=None)],
    ids=["abc", "xnor", "float_input"],
)
def test_summary_and_export_report_name_every_layer_alike(overrides):
    """One vocabulary: the export report's type column is the summary's type column."""
    import binax.export

    model = models.create("bnn_mlp", widths=(64, 64), **overrides)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 28, 28, 1)))
    kinds = {r.name: r.kind for r in binax.summary(model, (28, 28, 1)).layers}
    packed = binax.export.export(model, variables, preprocessing="fashion_mnist")
    rows = packed.rows()
    assert {r.path for r in rows} >= {"fc0", "fc1", "classifier"}
    for r in rows:
        assert r.kind == kinds[r.path], (r.path, r.kind, kinds[r.path])
    assert kinds["classifier"] == "Dense (float)"
    assert "not quantized" not in packed.report()


@pytest.mark.parametrize(
    "overrides, planes",
    [
        (dict(input_quantizer="duo_ternary", kernel_quantizer="duo_weight"), 2),  # decouples into 2 binary
        (dict(input_quantizer="dorefa", input_quantizer_kwargs={"k_bit": 2}), None),  # 2-bit: not binary
        (dict(input_quantizer="dorefa", input_quantizer_kwargs={"k_bit": 1}), 1),
        (dict(input_quantizer=None), None),  # binary weights, float inputs: float MACs
    ],
)
def test_a_mac_is_binary_only_when_both_operands_are(overrides, planes):
    s = binax.summary(models.create("cnn_small", **overrides), (28, 28, 1))
    base = 28 * 28 * 9 * 32 * 32 + 14 * 14 * 9 * 32 * 64 + 14 * 14 * 9 * 64 * 64
    first_and_last = 28 * 28 * 9 * 1 * 32 + 7 * 7 * 64 * 10
    if planes is None:
        assert (s.binary_macs, s.float_macs, s.binary_ops) == (0, base + first_and_last, 0)
        assert s.layer("conv1").kind == "Conv (float)"
    else:
        assert (s.binary_macs, s.float_macs, s.binary_ops) == (base, first_and_last, planes * base)
        assert s.layer("conv1").kind == "BinaryConv"
    assert s.binary_params == 9 * (32 * 32 + 32 * 64 + 64 * 64)  # the weights stay binary


def test_totals_add_up_with_k_bit_parameters():
    """Ternary (2-bit) weights: neither binary nor float, and still in every total."""
    s = binax.summary(models.create("cnn_small", kernel_quantizer="ste_tern"), (28, 28, 1))
    t = s.totals
    ternary = 9 * (32 * 32 + 32 * 64 + 64 * 64)
    assert t.params_by_bits[2] == ternary and t.binary_params == 0
    assert sum(t.params_by_bits.values()) == t.params == t.binary_params + t.float_params + ternary
    assert t.trainable_params + t.non_trainable_params == t.params
    assert t.memory_bytes == sum(b * n for b, n in t.params_by_bits.items()) / 8
    assert sum(t.macs_by_bits.values()) == t.macs == t.binary_macs + t.float_macs
    assert f"Total params: {t.params:,} ({ternary:,} 2-bit, {t.float_params:,} 32-bit)" in str(s)
    for field in ("params", "trainable_params", "memory_bits", "macs", "binary_macs", "binary_ops"):
        assert sum(getattr(r, field) for r in s.layers) == (
            getattr(t, field) if field != "memory_bits" else 8 * t.memory_bytes
        ), field


def test_to_dict_and_to_markdown():
    s = binax.summary(models.create("cnn_small"), (28, 28, 1))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["model"] == "VGG" and d["input_shape"] == [28, 28, 1]
    assert [r["name"] for r in d["layers"]] == [r.name for r in s.layers]
    assert d["totals"]["params"] == s.totals.params and d["totals"]["binary_ops"] == s.binary_ops
    conv1 = next(r for r in d["layers"] if r["name"] == "conv1")
    assert (conv1["kind"], conv1["input_bits"], conv1["kernel_bits"], conv1["params_by_bits"]) == (
        "BinaryConv", 1, 1, {"1": 9 * 32 * 32}
    )
    md = s.to_markdown().splitlines()
    assert md[2].startswith("| Layer | Type | In bits | W bits | Output shape |")
    assert md[3].startswith("|---|---|---:|")
    table = [line for line in md if line.startswith("| ")]
    assert len(table) == 1 + len(s.layers) + 1 and table[-1].startswith("| **Total** |")
    assert any(line.startswith("- Trainable params:") for line in md)


def test_binary_first_layer_weights_with_float_inputs():
    s = binax.summary(models.create("bnn_mlp", first_layer_float=False), (28, 28, 1))
    fc0 = s.layer("fc0")
    assert (fc0.binary_params, fc0.input_bits, fc0.kernel_bits) == (784 * 2048, 32, 1)
    assert (fc0.binary_macs, fc0.float_macs) == (0, 784 * 2048)
    assert s.layer("fc1").binary_macs == 2048 * 2048


def test_bad_input_shapes_raise():
    with pytest.raises(ConfigError, match="input_shape"):
        binax.summary(models.create("cnn_small"), 28)
    with pytest.raises(ValueError, match="rank 4"):
        binax.summary(models.create("cnn_small"), (28, 28))
    with pytest.raises(ValueError, match="at least"):
        binax.summary(models.create("vgg_small"), (4, 4, 3))
