"""LCE export (binax.export.lce): the ``.tflite`` in Larq Compute Engine's interpreter gives
binax's packed predictions, and the Larq/Keras model binax's eval graph.

Weights are random (``test_export.random_params``: a quarter of BatchNorm γ negative) with
BatchNorm statistics calibrated on the first 64 inputs and then perturbed, so the
thresholds fall inside the accumulator ranges and the models predict many classes (checked).
``bnn_mlp`` and ``cnn_small`` run on all 10,000 Fashion-MNIST test images (every method
on ``cnn_small``; BNN at full width, the others at half width for the suite's time budget);
``vgg_small`` on its configs' CIFAR shape, 32×32×3, with 128 random raw images (no CIFAR-10
here). All models convert in ONE worker process (TensorFlow starts once).

The comparison is exact by construction, not by one machine's rounding: binary
accumulators are integers in both engines, and the one float layer whose outputs are
binarized (the first) is made exact too: raw pixel values (integers 0..255) in, an
integer kernel, no bias, so every sum is an integer below 2^24 in any order; its
BatchNorm has β = 0 and a mean halfway between integers, so ``sign(BN(x)) = ±sign(x − μ)``
whatever the rounding of the scale (and ReActNet's first RPReLU has no shifts and a
positive slope, which keeps that sign). What remains float is the classifier, which only
reorders a near-tie.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import binax
import binax.data
import binax.export as bx
from binax import transforms
from binax.errors import ConfigError, MissingDependencyError
from binax.export import lce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_export import calibrated  # noqa: E402  (random weights, calibrated BatchNorms)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# find_spec, not importorskip: importing LCE would import TensorFlow (Keras 3) into this
# pytest worker; the conversion runs in lce_worker.py's own process.
HAVE_LCE = importlib.util.find_spec("larq_compute_engine") is not None or bool(os.environ.get("BINAX_LCE_PYTHON"))
needs_lce = pytest.mark.skipif(
    not HAVE_LCE, reason="larq-compute-engine is not installed (no wheel for this platform; pip install 'binax[lce]')"
)
# LCE 0.16's interpreter is compiled against NumPy 1 (lce_worker.interpreter_ready).
INTERPRETER_OK = bool(os.environ.get("BINAX_LCE_PYTHON")) or int(np.__version__.split(".")[0]) < 2
needs_interpreter = pytest.mark.skipif(
    not (HAVE_LCE and INTERPRETER_OK),
    reason="LCE's interpreter needs NumPy < 2: set BINAX_LCE_PYTHON to such a Python (bash dev.sh test does)",
)

# name -> model overrides of configs/recipe.py's METHODS that LCE maps.
METHODS = {
    "bnn": dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    # BNN with a binary classifier: a binary dense layer over a flattened map (stored per
    # pixel), with a bias, decoded into the logits.
    "bnn_binary_classifier": dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign", last_layer_float=False),
    "xnor": dict(input_quantizer="ste_sign", kernel_quantizer="xnor_weight"),
    "bireal": dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight"),
    "reactnet": dict(input_quantizer="approx_sign", kernel_quantizer="xnor_weight", activation="rprelu"),
    "irnet": dict(
        input_quantizer="ede_sign",
        input_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0},
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0},
        activation="hardtanh",
    ),
    "sb": dict(
        input_quantizer="tanh_sign",
        input_quantizer_kwargs={"nu_0": 1.0, "nu_max": 1e9},
        kernel_quantizer="tanh_sign",
        kernel_quantizer_kwargs={"nu_0": 1.0, "nu_max": 1e9, "relative": True},
    ),
}
# (model, method) pairs the equality tests run: every method on cnn_small, and on the
# 1024-wide MLP and VGG-small the ones that differ most in what the converter emits.
CASES = [("cnn_small", m) for m in METHODS] + [("bnn_mlp", "bnn"), ("bnn_mlp", "sb"), ("vgg_small", "irnet")]
# Every case runs on all 10,000 Fashion-MNIST test images. LCE's x86 interpreter (about
# 3 ms per image for the full-width cnn_small on one core) is the slow part of the suite's
# budget, so BNN runs the full-width cnn_small and the other methods its half-width form
# (a quarter of the binary MACs; the same layers, so the same converter patterns), and
# the MLP is 512 wide.
HALF_WIDTH = dict(width_multiplier=0.5)
MODEL_CONFIG = {"bnn_mlp": HALF_WIDTH, "cnn_small": HALF_WIDTH}
FULL_WIDTH = {"cnn_small-bnn"}
N_VGG = 128
N_EVAL = 200  # the Keras model against the eval graph on the first 200 inputs
# Logits agree within TOL × max|logit| (the classifier's float sums in another order), and
# predictions wherever the top two logits are further apart than that.
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _images(model_name: str) -> tuple[np.ndarray, str]:
    if model_name == "vgg_small":
        return np.random.default_rng(0).integers(0, 256, (N_VGG, 32, 32, 3), dtype=np.uint8), "cifar10"
    return binax.data.load_arrays("fashion_mnist", "test")[0], "fashion_mnist"


def _eval_graph(model, variables, x: np.ndarray, batch: int = 500) -> np.ndarray:
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False, progress=1.0))
    return np.concatenate([np.asarray(fn(variables, x[i : i + batch])) for i in range(0, len(x), batch)])


def _first(params: dict) -> str:
    """The first layer's name (``conv0`` or ``fc0``): the float layer that takes the pixels."""
    return next(name for name in ("conv0", "fc0") if name in params)


def _exact_first_layer(params: dict) -> dict:
    """Integer first kernel (std ~2; no bias in these models) and β = 0 after it."""
    params = jax.tree.map(np.asarray, params)
    kernel = params[_first(params)]["kernel"]
    fan_in = int(np.prod(kernel.shape[:-1]))
    params[_first(params)]["kernel"] = np.round(kernel * 2 * np.sqrt(fan_in)).astype(np.float32)
    params["bn0"]["bias"] = np.zeros_like(params["bn0"]["bias"])
    if "bn0_act" in params:  # RPReLU: no shifts, slope > 0
        act = params["bn0_act"]
        act["shift_in"], act["shift_out"] = np.zeros_like(act["shift_in"]), np.zeros_like(act["shift_out"])
        act["slope"] = np.maximum(act["slope"], np.float32(0.1))
    return params


def build(model_name: str, method: str):
    """(packed model, inputs: raw pixel values as float32, the deployed model, its variables)."""
    raw, _ = _images(model_name)
    overrides = {} if f"{model_name}-{method}" in FULL_WIDTH else MODEL_CONFIG.get(model_name, {})
    model = binax.models.create(model_name, **METHODS[method], **overrides)
    x = raw.astype(np.float32)
    variables, _, _ = calibrated(model, x[:64], adjust_params=_exact_first_layer)
    stats = variables["batch_stats"]["bn0"]
    stats["mean"] = (np.floor(np.asarray(stats["mean"])) + 0.5).astype(np.float32)
    kernel = np.asarray(variables["params"][_first(variables["params"])]["kernel"])
    assert np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0).max() * 255 < 2**24  # exact sums
    if method == "sb":  # Self-Binarizing's deployed form: sign, BN -> sign folded to BinaryBN
        model, variables = transforms.self_binarizing_inference(model, variables, x.shape[1:])
    return bx.export(model, variables, preprocessing=None, input_shape=x.shape[1:]), x, model, variables


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``{case: (result, packed logits, inputs, model, variables)}``: all cases in one worker."""
    built = {f"{m}-{k}": build(m, k) for m, k in CASES}
    tmp = str(tmp_path_factory.mktemp("lce"))
    results = lce.run_lce(
        {k: b[0] for k, b in built.items()},
        tmp,
        batch_size=250,
        inputs={k: b[1] for k, b in built.items()},
        keras_count=N_EVAL,
    )
    return {
        k: (results[k], np.asarray(b[0].forward(b[1])), b[1], b[2], b[3]) for k, b in built.items()
    }


def _close(got: np.ndarray, want: np.ndarray) -> None:
    scale = TOL * float(np.abs(want).max())
    off = np.abs(got - want).max(-1) > scale
    assert not off.any(), f"{off.sum()} of {len(want)} images' logits differ beyond {TOL} x max|logit|"
    top2 = np.sort(want, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > scale
    assert clear.mean() > 0.99  # near-ties are rare: the comparison is not vacuous
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("case", [f"{m}-{k}" for m, k in CASES])
def test_lce_interpreter_predicts_what_the_packed_model_predicts(converted, case):
    result, packed_logits, x, _, _ = converted[case]
    assert len(x) == (N_VGG if case.startswith("vgg") else 10_000)
    assert len(np.unique(packed_logits.argmax(-1))) >= 5  # not one class for everything
    _close(result["lce"], packed_logits)


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("case", [f"{m}-{k}" for m, k in CASES])
def test_keras_model_computes_the_eval_graph(converted, case):
    result, _, x, model, variables = converted[case]
    _close(result["keras"], _eval_graph(model, variables, x[:N_EVAL]))


@pytest.mark.slow
@needs_interpreter
def test_binary_layers_become_lce_binary_ops(converted):
    """LCE's converter turned the Larq layers into its binary convolutions (not float ones),
    for the CNN and for the MLP's dense layers."""
    result, *_ = converted["cnn_small-bnn"]
    data = open(result["tflite"], "rb").read()
    assert b"LceBconv2d" in data and b"LceQuantize" in data
    # The MLP's binary dense layers too (mapped as 1×1 binary convolutions).
    mlp = open(converted["bnn_mlp-bnn"][0]["tflite"], "rb").read()
    assert b"LceBconv2d" in mlp


@pytest.mark.parametrize(
    "name, cfg, where",
    [
        ("cnn_small", dict(input_quantizer="duo_binary", kernel_quantizer="duo_weight"), "conv1: input quantizer 'duo_binary'"),
        ("cnn_small", dict(layer_type="abc", abc_m=2, abc_n=2), "conv1: ABC-Net layer"),
        ("cnn_small", dict(input_quantizer="ste_sign", kernel_quantizer="ste_tern"), "conv1: "),
        ("cnn_small", dict(pad_values=0.0), "conv1: pads a binary input with 0.0"),
        ("cnn_small", dict(pad_values=-1.0), "conv0: pads a float input with -1.0"),
        ("resnet20", dict(width_multiplier=0.25), "resnet20 runs on the generic runtime"),
    ],
)
def test_what_lce_cannot_run_is_refused_in_one_line_naming_the_layer(name, cfg, where):
    model = binax.models.create(name, **cfg)
    shape = (32, 32, 3) if name == "resnet20" else (28, 28, 1)
    x = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    variables, _, _ = calibrated(model, x)
    packed = bx.export(model, variables, preprocessing=None, input_shape=shape)
    with pytest.raises(ConfigError) as err:
        lce.keras_layers(packed)
    msg = str(err.value)
    assert msg.startswith("cannot export to LCE") and where in msg and "\n" not in msg


def test_geometry_keras_cannot_express_is_refused():
    """Explicit paddings, dilation and grouped convolutions: refused, naming the layer."""
    from binax import layers
    from binax.models.common import Step

    explicit = layers.Geometry((3, 3), 1, ((1, 1), (1, 1)), pad_value=1.0)
    with pytest.raises(ConfigError, match=r"conv2: padding \(\(1, 1\), \(1, 1\)\)"):
        lce._padding(("conv2",), explicit, float_input=False)
    assert lce._padding(("conv2",), layers.Geometry((3, 3), 1, "SAME", pad_value=1.0), float_input=False) == "same"
    with pytest.raises(ConfigError, match="conv2: dilated or grouped"):
        lce._conv(("conv2",), layers.BinaryConv(4, (3, 3), kernel_dilation=(2, 2)))
    with pytest.raises(ConfigError, match="conv2: dilated or grouped"):
        lce._conv(("conv2",), layers.BinaryConv(4, (3, 3), feature_group_count=2))
    with pytest.raises(ConfigError, match="conv2: 1-d convolution"):
        lce._conv(("conv2",), layers.BinaryConv(4, (3,)))
    with pytest.raises(ConfigError, match="max_pool: padding"):
        lce.max_pool_fields(Step.max_pool((2, 2), (2, 2), padding=((0, 1), (0, 1))))
    assert lce.max_pool_fields(Step.max_pool((2, 2), (2, 2)))["padding"] == "valid"


@pytest.mark.slow
@needs_lce
@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="the guard is for NumPy >= 2")
def test_interpreter_under_numpy_2_is_refused_with_the_fix(tmp_path, monkeypatch):
    """LCE 0.16's interpreter reads NumPy 2 arrays as 0 bytes: a clear error, not garbage."""
    monkeypatch.delenv("BINAX_LCE_PYTHON", raising=False)
    model = binax.models.create("bnn_mlp", widths=(32,))
    x = np.random.default_rng(0).standard_normal((8, 28, 28, 1)).astype(np.float32)
    packed = bx.export(model, calibrated(model, x)[0], preprocessing=None, input_shape=(28, 28, 1))
    with pytest.raises(MissingDependencyError, match="BINAX_LCE_PYTHON"):
        lce.run_lce({"m": packed}, str(tmp_path), inputs={"m": x})


@pytest.mark.slow
@needs_lce
def test_export_command_writes_model_tflite(tmp_path):
    """``python -m experiments.export --workdir W --format lce`` -> ``W/model.tflite``, nothing else left."""
    import optax

    from binax.train import Checkpoints, TrainState
    from configs import common as config_common

    config = config_common.base_config()
    config.model = config_common.model_config("bnn_mlp", widths=(40, 36))
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    model = binax.models.create("bnn_mlp", widths=(40, 36))
    x = np.random.default_rng(0).standard_normal((8, 28, 28, 1)).astype(np.float32)
    v, _, _ = calibrated(model, x)
    ckpts = Checkpoints(str(tmp_path / "checkpoints"))
    state = TrainState(
        step=jax.numpy.asarray(3, jax.numpy.int32),
        params=v["params"],
        batch_stats=v["batch_stats"],
        opt_state=optax.sgd(0.1).init(v["params"]),
        rng=jax.random.PRNGKey(0),
    )
    ckpts.save(3, state, accuracy=0.5)
    ckpts.close()
    before = set(os.listdir(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.export", "--workdir", str(tmp_path), "--format", "lce"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(os.listdir(tmp_path)) - before == {"model.tflite"}
    data = (tmp_path / "model.tflite").read_bytes()
    assert data[4:8] == b"TFL3" and b"LceBconv2d" in data
    assert "model.tflite" in proc.stdout


def test_core_package_does_not_import_tensorflow():
    """binax and binax.export.lce import without TensorFlow (it runs in the worker only)."""
    code = "import sys, binax, binax.export, binax.export.lce; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
