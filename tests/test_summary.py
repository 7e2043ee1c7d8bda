"""binax.summary: parameters by bit-width, memory and binary/float MACs, by hand."""

import pytest

import binax
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
    assert t.memory_bytes == binary_params / 8 + 4 * float_params
    assert t.float32_bytes == 4 * (binary_params + float_params)
    assert t.compression_ratio == pytest.approx(t.float32_bytes / t.memory_bytes)
    assert t.binary_mac_fraction == pytest.approx(binary_macs / (binary_macs + float_macs))

    conv1 = s.layer("conv1")
    assert conv1.output_shape == (32, 32, 128)
    assert (conv1.input_bits, conv1.kernel_bits, conv1.memory_bits) == (1, 1, 9 * 128 * 128)
    assert s.layer("bn1").output_shape == (16, 16, 128)  # pooled before the batch norm

    table = str(s)
    for text in ("conv5", "classifier", "1-bit", "32-bit", "Binary MACs", f"{binary_macs:,}", "compression"):
        assert text in table


def test_bireal_resnet18_matches_the_papers_operation_counts():
    # Bi-Real Net (Liu et al. 2018), ResNet-18: 1.68e9 binary ops and 1.63e8 FLOPs, where
    # FLOPs = float MACs + binary/64. Our counts, from the layer shapes:
    s = binax.summary(models.create("resnet18"), (224, 224, 3))
    stage = lambda side, cin, cout, n: side * side * 9 * (cin * cout + (n - 1) * cout * cout)  # noqa: E731
    binary = stage(56, 64, 64, 4) + stage(28, 64, 128, 4) + stage(14, 128, 256, 4) + stage(7, 256, 512, 4)
    downsample = 28 * 28 * 64 * 128 + 14 * 14 * 128 * 256 + 7 * 7 * 256 * 512  # float 1x1 convs
    floats = 112 * 112 * 7 * 7 * 3 * 64 + downsample + 512 * 1000
    assert (s.binary_macs, s.float_macs) == (binary, floats)
    assert s.binary_macs == pytest.approx(1.68e9, rel=0.005)
    assert s.float_macs + s.binary_macs / 64 == pytest.approx(1.63e8, rel=0.01)  # 1.638e8 here


def test_abc_layers_count_m_bits_and_m_times_n_binary_macs():
    m, n = 3, 2
    s = binax.summary(models.create("cnn_small", layer_type="abc", abc_m=m, abc_n=n), (28, 28, 1))
    base = 28 * 28 * 9 * 32 * 32 + 14 * 14 * 9 * 32 * 64 + 14 * 14 * 9 * 64 * 64
    weights = 9 * (32 * 32 + 32 * 64 + 64 * 64)
    assert s.binary_macs == m * n * base
    assert s.totals.params_by_bits[m] == weights
    assert s.binary_params == weights
    abc = s.layer("conv1")
    assert abc.kind == "ABCConv" and abc.memory_bits == m * 9 * 32 * 32 + 32 * 2 * n  # + shifts, betas


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
        assert (s.binary_macs, s.float_macs) == (0, base + first_and_last)
    else:
        assert (s.binary_macs, s.float_macs) == (planes * base, first_and_last)
    assert s.binary_params == 9 * (32 * 32 + 32 * 64 + 64 * 64)  # the weights stay binary


def test_binary_first_layer_weights_with_float_inputs():
    s = binax.summary(models.create("bnn_mlp", first_layer_float=False), (28, 28, 1))
    fc0 = s.layer("fc0")
    assert (fc0.binary_params, fc0.input_bits, fc0.kernel_bits) == (784 * 2048, 32, 1)
    assert (fc0.binary_macs, fc0.float_macs) == (0, 784 * 2048)
    assert s.layer("fc1").binary_macs == 2048 * 2048


def test_bad_input_shapes_raise():
    with pytest.raises(ValueError, match="input_shape"):
        binax.summary(models.create("cnn_small"), 28)
    with pytest.raises(ValueError, match="rank 4"):
        binax.summary(models.create("cnn_small"), (28, 28))
    with pytest.raises(ValueError, match="at least"):
        binax.summary(models.create("vgg_small"), (4, 4, 3))
