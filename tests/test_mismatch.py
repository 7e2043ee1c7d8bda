"""binax.mismatch: the smoothed-loss gradient against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from binax import binarizers, mismatch


def _linear_sign_problem(d=6, terms=3, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(terms, d)).astype(np.float32)
    b = rng.normal(size=(terms,)).astype(np.float32) * 0.3
    c = rng.normal(size=(terms,)).astype(np.float32)
    theta = rng.normal(size=(d,)).astype(np.float32) * 0.2
    return a, b, c, theta


def _loss(a, b, c):
    # L(θ) = Σ_j c_j sign(a_j·θ + b_j): piecewise constant, zero gradient almost everywhere.
    return lambda theta: jnp.sum(c * binarizers.sign(a @ theta + b))


def _closed_form_grad(a, b, c, theta, sigma):
    # E sign(a·θ + b + σ a·ε) = 2Φ(z) − 1 with z = (a·θ + b)/(σ|a|), so
    # ∇L_σ = Σ_j c_j · 2φ(z_j)/(σ|a_j|) · a_j.
    an = np.linalg.norm(a, axis=1)
    z = (a @ theta + b) / (sigma * an)
    return ((c * 2 * norm.pdf(z) / (sigma * an))[:, None] * a).sum(0)


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_smoothed_grad_matches_closed_form_within_stderr(sigma):
    a, b, c, theta = _linear_sign_problem()
    est = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(1), sigma,
                                 num_samples=4096, chunk_size=256, num_groups=8)
    exact = _closed_form_grad(a, b, c, theta, sigma)
    z = (np.asarray(est.grad) - exact) / np.asarray(est.stderr)
    # Deterministic seed; 4 standard errors per coordinate.
    assert np.all(np.abs(z) < 4.0), z
    # The estimate is informative, not just noisy: it points along the true gradient.
    assert float(mismatch.cosine(est.grad, exact)) > 0.95
    assert est.num_samples == 4096


def test_smoothed_grad_stderr_shrinks_with_samples():
    a, b, c, theta = _linear_sign_problem()
    small = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(2), 0.3,
                                   num_samples=256, chunk_size=32)
    big = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(2), 0.3,
                                 num_samples=4096, chunk_size=256)
    ratio = np.asarray(small.stderr) / np.asarray(big.stderr)
    assert np.all((ratio > 2.5) & (ratio < 6.0)), ratio  # sqrt(16) = 4


def test_smoothed_grad_works_on_pytrees_and_groups_average_to_mean():
    params = {"w": jnp.ones((3, 2)) * 0.1, "b": jnp.zeros((2,))}
    loss = lambda p: jnp.sum(binarizers.sign(jnp.ones(3) @ p["w"] + p["b"]))
    est = mismatch.smoothed_grad(loss, params, jax.random.key(0), 0.2, num_samples=64, chunk_size=8, num_groups=4)
    assert jax.tree.map(jnp.shape, est.grad) == {"w": (3, 2), "b": (2,)}
    assert est.group_grads["w"].shape == (4, 3, 2)
    np.testing.assert_allclose(jnp.mean(est.group_grads["w"], 0), est.grad["w"], rtol=1e-5, atol=1e-6)


def test_coordinate_discrete_grad_on_a_single_sign():
    # L(θ) = Σ_i c_i sign(θ_i): stepping θ_i by ±(|θ_i| + m) flips exactly one side, so
    # g_i = c_i (sign(θ_i + h) − sign(θ_i − h)) / (2h) = c_i / (|θ_i| + m).
    theta = jnp.array([0.3, -0.2, 0.05, -0.7])
    c = jnp.array([1.0, -2.0, 0.5, 3.0])
    loss = lambda t: jnp.sum(c * binarizers.sign(t))
    cdg, mask = mismatch.coordinate_discrete_grad(loss, theta, jax.random.key(0), num_coords=4, margin=1e-2)
    np.testing.assert_allclose(cdg, c / (jnp.abs(theta) + 1e-2), rtol=1e-5)
    np.testing.assert_array_equal(mask, jnp.ones(4))


def test_cosine_with_ci_brackets_the_value():
    a, b, c, theta = _linear_sign_problem()
    est = mismatch.smoothed_grad(_loss(a, b, c), jnp.asarray(theta), jax.random.key(3), 0.3,
                                 num_samples=512, chunk_size=64, num_groups=8)
    exact = _closed_form_grad(a, b, c, theta, 0.3)
    sim = mismatch.cosine_with_ci(jnp.asarray(exact), est)
    assert sim.low <= sim.value <= sim.high
    assert sim.value > 0.8
    # An orthogonal direction has cosine ≈ 0.
    assert abs(float(mismatch.cosine(jnp.array([1.0, 0]), jnp.array([0, 2.0])))) < 1e-7


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma"):
        mismatch.smoothed_grad(lambda p: jnp.sum(p), jnp.ones(2), jax.random.key(0), 0.0)


# ------------------------------------------------------------ separable smoothing


def _separable_problem(rows=16, d=5, seed=0):
    # ℓ_b(δ_b) = c_b sign(a_b·δ_b + b_b): example b sees only row b of δ.
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, d)).astype(np.float32)
    b = (rng.normal(size=(rows,)) * 0.2).astype(np.float32)
    c = rng.normal(size=(rows,)).astype(np.float32)
    per_example = lambda delta: c * binarizers.sign(jnp.sum(a * delta, -1) + b)
    return a, b, c, per_example


@pytest.mark.slow
def test_separable_smoothed_grad_matches_closed_form_and_beats_the_joint_estimate():
    a, b, c, per_example = _separable_problem()
    rows, sigma = a.shape[0], 0.3
    delta = jnp.zeros(a.shape)
    # Gradient of the MEAN loss: row b is (1/B) c_b 2φ(z_b)/(σ|a_b|) a_b, z_b = b_b/(σ|a_b|).
    an = np.linalg.norm(a, axis=1)
    exact = (c * 2 * norm.pdf(b / (sigma * an)) / (sigma * an))[:, None] * a / rows
    sep = mismatch.smoothed_grad(per_example, delta, jax.random.key(4), sigma, num_samples=2048,
                                 chunk_size=256, separable=True)
    z = (np.asarray(sep.grad) - exact) / np.asarray(sep.stderr)
    assert np.all(np.abs(z) < 4.5), z
    joint = mismatch.smoothed_grad(lambda d: jnp.mean(per_example(d)), delta, jax.random.key(4), sigma,
                                   num_samples=2048, chunk_size=256)
    # Same samples, same expectation; the joint estimate carries every other row's noise.
    assert np.median(np.asarray(joint.stderr) / np.asarray(sep.stderr)) > 2.0


def test_separable_needs_a_common_leading_axis():
    with pytest.raises(ValueError, match="leading"):
        mismatch.smoothed_grad(lambda p: p["x"][:, 0], {"x": jnp.zeros((4, 2)), "y": jnp.zeros((3,))},
                               jax.random.key(0), 0.1, separable=True)


# ------------------------------------------------------------ corrected cosine


def test_corrected_cosine_removes_the_monte_carlo_shrinkage():
    rng = np.random.default_rng(0)
    d, groups = 4000, 8
    g = rng.normal(size=d)
    # An estimator at a known angle to the true gradient: cos = 0.6.
    orth = rng.normal(size=d)
    orth -= orth @ g / (g @ g) * g
    e = 0.6 * g / np.linalg.norm(g) + 0.8 * orth / np.linalg.norm(orth)
    # Group means = truth + noise much larger per coordinate than the signal (d/N >> 1).
    noisy = g[None] + rng.normal(size=(groups, d)) * 6.0
    raw, corrected = mismatch.group_similarities(jnp.asarray(e), jnp.asarray(noisy))
    # Expected shrinkage 1/sqrt(1 + 36/8) ≈ 0.43: raw ≈ 0.26.
    assert raw.value < 0.35  # the plain cosine shrinks ...
    assert corrected.low <= 0.6 <= corrected.high  # ... the corrected one does not
    assert corrected.high - corrected.low < 0.3


def test_group_similarities_needs_three_groups():
    with pytest.raises(ValueError, match="3 groups"):
        mismatch.group_similarities(jnp.ones(3), jnp.ones((2, 3)))


# ------------------------------------------------------------ estimators on a model

from binax import models  # noqa: E402

_TINY = dict(widths=(16, 16))


def _tiny_setup(overrides=None, n=32, seed=0):
    model = models.create("bnn_mlp", **_TINY, **(overrides or {}))
    x = jax.random.normal(jax.random.key(seed), (n, 4, 4, 1))
    y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
    variables = model.init(jax.random.key(seed + 2), x, train=False)
    # Non-trivial batch statistics, so the pre-activations are not exactly standardized.
    _, upd = model.apply(variables, x * 1.5 + 0.2, train=True, mutable=["batch_stats"])
    return model, {**variables, **upd}, x, y


@pytest.mark.slow
def test_activation_gradient_is_downstream_gradient_times_estimator_derivative():
    # d loss / d delta at the input of fc1 = (gradient reaching fc1's binarizer) * q'(x):
    # the perturbation must enter BEFORE the input binarizer.
    ests = mismatch.sign_estimators(ede_t=(3.0,), tanh_nu=())
    base = {}
    x_pre = None
    for label in ("STE", "clipped STE", "ApproxSign", "EDE t=3"):
        model, variables, x, y = _tiny_setup(ests[label])
        base[label] = np.asarray(mismatch.estimator_grad(model, variables, x, y, wrt="activations", layer="fc1"))
        if x_pre is None:
            x_pre = np.asarray(mismatch.module_input(
                lambda: model.apply(variables, x, train=False), "fc1"))
    assert base["STE"].shape == x_pre.shape == (32, 16)
    np.testing.assert_allclose(base["clipped STE"], base["STE"] * (np.abs(x_pre) <= 1), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(base["ApproxSign"], base["STE"] * np.maximum(0, 2 - 2 * np.abs(x_pre)),
                               rtol=1e-4, atol=1e-8)
    t, k = 3.0, 1.0  # k = max(1/t, 1)
    np.testing.assert_allclose(base["EDE t=3"], base["STE"] * k * t / np.cosh(t * x_pre) ** 2,
                               rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_weight_subset_gradient_is_the_matching_columns_of_the_full_gradient():
    model, variables, x, y = _tiny_setup(n=8)
    full = mismatch.estimator_grad(model, variables, x, y, wrt="weights")
    assert set(full) == {"fc1/latent_kernel"}  # fc0 (float first layer) is not binary
    sub = mismatch.estimator_grad(model, variables, x, y, wrt="weights", layer="fc1", max_channels=5, seed=3)
    cols = mismatch._channel_subsets({"fc1/latent_kernel": full["fc1/latent_kernel"]}, 5, 3)["fc1/latent_kernel"]
    assert sub["fc1/latent_kernel"].shape == (16, 5)
    np.testing.assert_allclose(sub["fc1/latent_kernel"], full["fc1/latent_kernel"][:, cols], rtol=1e-6)
    with pytest.raises(ValueError, match="fc7"):
        mismatch.make_loss(model, variables, x, y, wrt="weights", layer="fc7")
    with pytest.raises(ValueError, match="wrt"):
        mismatch.make_loss(model, variables, x, y, wrt="biases")


def test_deployed_forward_groups_sign_estimators_and_keeps_other_forwards():
    ests = mismatch.sign_estimators()
    refs = {mismatch._canonical(mismatch.deployed_forward(o, "bnn_mlp")) for o in ests.values()}
    assert len(refs) == 1 and "'sign'" in refs.pop()
    tern = mismatch.MULTILEVEL_ACTIVATIONS["duo_ternary {0,½,1}"]
    assert mismatch.deployed_forward(tern, "bnn_mlp")["input_quantizer"] == "duo_ternary"


@pytest.mark.slow
def test_compare_estimators_recovers_an_exact_gradient_of_a_smooth_loss():
    # tanh(ν x) with ν = 1 is smooth: measured against its OWN loss, its (exact) gradient
    # is ∇L_σ as σ -> 0, so the corrected cosine is ~1 while the raw one is shrunk by noise.
    tanh = mismatch.fixed_tanh(1.0)
    model, variables, x, y = _tiny_setup(tanh)
    ests = {"tanh ν=1": tanh, "STE": mismatch.sign_estimators()["STE"]}
    rows = mismatch.compare_estimators(
        "bnn_mlp", _TINY, variables, (x, y), ests, sigmas=[0.01], num_samples=[96, 192],
        wrt="activations", layer="fc1", chunk_size=16, num_groups=6, references={"tanh ν=1": tanh})
    assert [(r["estimator"], r["num_samples"]) for r in rows] == [
        ("tanh ν=1", 96), ("tanh ν=1", 192), ("STE", 96), ("STE", 192)]
    own = rows[1]
    assert own["reference"].startswith("tanh_sign") and rows[3]["reference"] == "sign"
    assert own["corrected_ci_low"] <= 1.0 and own["cosine_corrected"] > 0.95
    assert own["cosine"] < own["cosine_corrected"]
    assert rows[0]["cosine"] < rows[1]["cosine"]  # more samples, less shrinkage
    for r in rows:
        assert r["ci_low"] <= r["cosine"] <= r["ci_high"]
        assert r["layer"] == "fc1 (input)" and r["sigma"] == 0.01 and r["wrt"] == "activations"


@pytest.mark.slow
def test_compare_estimators_on_weights_gives_one_row_per_kernel():
    model, variables, x, y = _tiny_setup(n=16)
    rows = mismatch.compare_estimators(
        "bnn_mlp", _TINY, variables, {"image": x, "label": y}, {"STE": mismatch.sign_estimators()["STE"]},
        sigmas=[0.05, 0.2], num_samples=48, wrt="weights", chunk_size=16, num_groups=3)
    assert [(r["layer"], r["sigma"]) for r in rows] == [("fc1/latent_kernel", 0.05), ("fc1/latent_kernel", 0.2)]
    assert all(r["num_samples"] == 48 and -1 <= r["cosine"] <= 1 for r in rows)


@pytest.mark.slow
def test_experiment_trains_its_networks_with_the_training_loop(tmp_path):
    from binax import mismatch_study as study
    from binax import train

    clipped = mismatch.sign_estimators()["clipped STE"]
    seen = []

    def probe(step, state, metrics):  # a caller's hook runs in the same loop, beside the study's
        seen.append((step, int(state.step), metrics is None))

    result = study.train(clipped, widths=(32, 32), steps=60, snapshot_steps=(0, 30), workdir=str(tmp_path),
                         hooks=[probe])
    assert seen == [(0, 0, True)] + [(s, s, False) for s in range(1, 61)]
    assert sorted(result.snapshots) == [0, 30] and result.losses.shape == (60,)
    assert not np.array_equal(result.snapshots[0]["params"]["fc1"]["latent_kernel"],
                              result.snapshots[30]["params"]["fc1"]["latent_kernel"])
    assert result.losses[-10:].mean() < 0.5 * result.losses[:5].mean()
    assert result.final["test_accuracy"] > 0.6  # the loop's evaluation on the 10,000 test images
    kernel = result.variables["params"]["fc1"]["latent_kernel"]
    assert float(jnp.max(jnp.abs(kernel))) <= 1.0  # bnn_mlp's latent-weight clip, applied by binax.train
    # The loop's checkpoint: a rerun in the workdir finds the finished run and trains nothing.
    ckpts = train.Checkpoints(str(tmp_path / "checkpoints"))
    assert ckpts.latest_step() == 60
    ckpts.close()
    again = study.train(clipped, widths=(32, 32), steps=60, workdir=str(tmp_path))
    assert again.losses.shape == (0,) and again.final == result.final
    np.testing.assert_array_equal(again.variables["params"]["fc1"]["latent_kernel"], kernel)
    config = study.train_config(clipped, widths=(32, 32), steps=60)
    assert (config.num_epochs, config.max_steps_per_epoch, config.progress_unit) == (1, 60, "step")
    assert study.train_config(clipped, widths=(32,), steps=2 * 468).num_epochs == 2
    with pytest.raises(ValueError, match="whole epochs"):
        study.train_config(clipped, widths=(32,), steps=500)


def test_each_network_of_the_study_trains_in_a_workdir_of_its_own():
    from binax import mismatch_study as study

    dirs = [study.network_dir("/w", label) for label in study.networks()]
    assert len(set(dirs)) == len(dirs) == 5
    assert study.network_dir("/w", "duo_ternary {0,½,1}") == "/w/duo_ternary_0_1"


def test_experiment_tables_and_verdict_read_the_rows():
    from binax import mismatch_study as study

    def row(network, estimator, sigma, corrected, n=64):
        return dict(network=network, estimator=estimator, reference="x", wrt="activations", layer="fc1 (input)",
                    sigma=sigma, num_samples=n, cosine=corrected / 2, ci_low=0.0, ci_high=1.0,
                    cosine_corrected=corrected, corrected_ci_low=corrected - 0.1, corrected_ci_high=corrected + 0.1)

    sign = study.SIGN_NETWORK
    rows = [row(sign, "clipped STE", 0.1, 0.3), row(sign, "EDE t=10", 0.1, 0.7),
            row("duo_binary {0,1}", "duo_binary {0,1}", 0.1, 0.5),
            row("duo_ternary {0,½,1}", "duo_ternary {0,½,1}", 0.1, 0.8),
            row(sign, "clipped STE", 0.3, 0.6), row(sign, "EDE t=10", 0.3, 0.4),
            row("duo_binary {0,1}", "duo_binary {0,1}", 0.3, 0.5),
            row("duo_ternary {0,½,1}", "duo_ternary {0,½,1}", 0.3, 0.8),
            row(sign, "clipped STE", 0.3, 0.0, n=8)]  # fewer samples: not in the tables
    verdict = study.binaryduo_verdict(rows)
    assert [(v["sigma"], v["holds"], v["beaten_by_ternary"]) for v in verdict] == [
        (0.1, False, []), (0.3, True, ["EDE t=10"])]
    np.testing.assert_allclose([v["ternary_gain"] for v in verdict], [0.3, 0.3])
    np.testing.assert_allclose([v["backward_gains"]["EDE t=10"] for v in verdict], [0.4, -0.2])
    summary = study.verdict_summary(verdict)
    assert summary[0].startswith("Partly reproduced") and "[0.3]" in summary[0]
    table = study.markdown_table(rows, wrt="activations").splitlines()
    assert table[0] == "| network | estimator | layer | σ=0.1 | σ=0.3 |"
    assert f"| {sign} | clipped STE | fc1 (input) | 0.30 [0.20, 0.40] | 0.60 [0.50, 0.70] |" in table
    assert len(table) == 2 + 4
