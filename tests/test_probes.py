"""What a run logs to TensorBoard besides losses: schedule scalars read from the quantizer
descriptors, and the pre-activations each sign binarizes (binax.train.probes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import binax
from binax import binarizers, models
from binax.train import probes


def _scalars(model, progress, shape=(8, 8, 1)):
    calls, _ = models.trace(model, shape)
    return probes.schedule_scalars(calls, progress)


@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0])
def test_tanh_sign_logs_nu_and_ede_logs_t_and_k_at_the_progress(progress):
    nu_kwargs = dict(nu_0=1.0, nu_max=1e9, start=0.9, nu_start=10.0)
    tanh = models.create("bnn_mlp", widths=(16, 16), input_quantizer="tanh_sign", input_quantizer_kwargs=nu_kwargs,
                         kernel_quantizer="ste_sign")
    got = _scalars(tanh, progress)
    assert list(got) == ["schedule/tanh_sign/nu"]  # ste_sign has no schedule: nothing logged for it
    assert got["schedule/tanh_sign/nu"] == pytest.approx(float(binarizers.nu_schedule(progress, **nu_kwargs)), rel=1e-5)

    ede = models.create("bnn_mlp", widths=(16, 16), input_quantizer="ede_sign",
                        input_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0}, kernel_quantizer="libra_pb")
    got = _scalars(ede, progress)
    t, k = binarizers.ede_params(progress)
    assert set(got) == {f"schedule/{q}/{v}" for q in ("ede_sign", "libra_pb") for v in ("t", "k")}
    assert got["schedule/ede_sign/t"] == pytest.approx(float(t), rel=1e-5)
    assert got["schedule/ede_sign/k"] == pytest.approx(float(k), rel=1e-5)


def test_a_registered_binarizer_with_a_schedule_is_logged_by_its_descriptor():
    def ramp_sign(x, slope):
        return binarizers.ste_sign(x * slope)

    binarizers.register("probe_ramp_sign", ramp_sign, bits=1, forward="sign", overwrite=True,
                        schedule=lambda progress, top=4.0: {"slope": 1.0 + (top - 1.0) * jnp.asarray(progress)},
                        schedule_outputs=("slope",))
    model = models.create("bnn_mlp", widths=(16, 16), input_quantizer="probe_ramp_sign",
                          input_quantizer_kwargs={"top": 3.0})
    assert _scalars(model, 0.5) == {"schedule/probe_ramp_sign/slope": pytest.approx(2.0)}


def test_a_standalone_rsign_with_a_schedule_is_logged():
    from binax.layers import RSign

    nu_kwargs = dict(nu_0=1.0, nu_max=100.0, start=0.5, nu_start=3.0)
    rsign = RSign(binarizer="tanh_sign", binarizer_kwargs=nu_kwargs)
    assert probes.quantizers_of(rsign) == {"binarizer": ("tanh_sign", nu_kwargs)}
    calls = [models.Call(("rsign",), rsign, (2, 4), (2, 4))]
    got = probes.schedule_scalars(calls, 0.25)
    assert got == {"schedule/tanh_sign/nu": pytest.approx(float(binarizers.nu_schedule(0.25, **nu_kwargs)), rel=1e-5)}


def test_layers_with_other_schedule_settings_get_their_own_scalar():
    model = models.create("bnn_mlp", widths=(16, 16, 16), input_quantizer="ede_sign",
                          input_quantizer_kwargs={"t_min": 0.1, "t_max": 10.0})
    calls, _ = models.trace(model, (8, 8, 1))
    other = [c for c in calls if c.path == ("fc2",)][0]
    changed = other.module.clone(input_quantizer_kwargs={"t_min": 1.0, "t_max": 100.0})
    calls = [c if c.path != ("fc2",) else type(c)(c.path, changed, c.in_shape, c.out_shape) for c in calls]
    got = probes.schedule_scalars(calls, 0.0)
    assert got["schedule/ede_sign/t"] == pytest.approx(0.1) and got["schedule/ede_sign/fc2/t"] == pytest.approx(1.0)


def test_pre_activations_are_the_inputs_of_the_binarized_activations_only():
    model = models.create("bnn_mlp", widths=(16, 12, 8), input_quantizer="ste_sign")
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 1)).astype(np.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    calls, _ = models.trace(model, x.shape[1:])
    got = probes.PreActivations(model, calls, x)(variables, progress=1.0)
    # fc0 takes the pixels (float first layer); fc1 and fc2 sign their inputs; the classifier is float.
    assert {k: v.shape for k, v in got.items()} == {"pre_activations/fc1": (5, 16), "pre_activations/fc2": (5, 12)}
    # fc1's input is what fc0 -> bn0 -> activation gives: fc1 applied to its sign reproduces fc1's output.
    fc1 = [c for c in calls if c.path == ("fc1",)][0].module
    _, seen = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    want = fc1.apply({"params": variables["params"]["fc1"]}, got["pre_activations/fc1"])
    np.testing.assert_allclose(want, seen["intermediates"]["fc1"]["__call__"][0], rtol=1e-5, atol=1e-5)
    fp = models.create("bnn_mlp", widths=(16,), input_quantizer=None, kernel_quantizer=None)
    fp_vars = jax.jit(lambda x: fp.init(jax.random.key(0), x, train=False))(x)
    assert probes.PreActivations(fp, models.trace(fp, x.shape[1:])[0], x)(fp_vars, 1.0) == {}
