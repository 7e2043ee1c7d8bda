"""binax.train in one process: optimizers (Bop, schedules, groups), the pure steps, metrics
files, the loop's error paths. The multi-device, multi-process and resume tests are in
test_train_distributed.py and test_train_resume.py."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import binax.models
from binax import binarizers, train
from binax.train import optimizers, steps
from configs import digits_mlp

EDE = {"t_min": 0.1, "t_max": 10.0}


def spec(**kw) -> ml_collections.ConfigDict:
    s = train.optimizer_config()
    s.update(kw)
    return s


def tiny_model(**kw):
    args = dict(
        widths=(16, 16),
        input_quantizer="ede_sign",
        input_quantizer_kwargs=EDE,
        kernel_quantizer="libra_pb",
        kernel_quantizer_kwargs=EDE,
        latent_weight_clip=None,
    )
    args.update(kw)
    return binax.models.create("bnn_mlp", **args)


def tiny_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(n, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, size=n).astype(np.int32),
    }


def tiny_state(model, tx, seed=0):
    # Jitted: one compilation instead of one per eager op of the model's init.
    return jax.jit(lambda key: steps.create_train_state(model, tx, (8, 8, 1), key))(jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- Bop


def test_bop_follows_the_formula_elementwise():
    tau, gamma = 0.05, 0.5
    w = jnp.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.3, -0.2, 1.0])
    m0 = jnp.array([0.0, 0.2, -0.2, 0.2, 0.2, 0.0, 0.0, 0.0])
    g = jnp.array([0.2, 0.0, 0.0, 0.0, 0.0, 0.2, -0.2, -0.2])
    tx = train.bop(threshold=tau, gamma=gamma)
    state = optimizers.BopState(count=jnp.zeros([], jnp.int32), momentum=m0)
    updates, new_state = tx.update(g, state, w)
    new_w = np.asarray(optax.apply_updates(w, updates))

    m = (1 - gamma) * np.asarray(m0) + gamma * np.asarray(g)
    s = np.where(np.asarray(w) >= 0, 1.0, -1.0)
    expected = np.where((np.abs(m) > tau) & (np.sign(m) == s), -s, s)
    np.testing.assert_allclose(np.asarray(new_state.momentum), m, rtol=1e-6)
    np.testing.assert_allclose(new_w, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(new_w[:5], expected[:5])  # exact from +-1 (and 0)
    # The cases spelled out: m pushes with w (flip), under the threshold, against w, w=0 is +1.
    np.testing.assert_allclose(new_w, [-1, -1, 1, -1, -1, -1, 1, 1], rtol=0, atol=1e-7)
    assert int(new_state.count) == 1


@pytest.mark.slow
def test_bop_group_updates_only_latent_kernels():
    model = tiny_model()
    tx, schedules = train.create_optimizer(
        spec(name="sgd", learning_rate=0.1, momentum=0.0, schedule="constant"),
        spec(name="bop", gamma=0.5, threshold=0.0, schedule="constant"),
        steps_per_epoch=10,
        num_epochs=1,
    )
    assert set(schedules) == {"learning_rate", "binary/gamma"}
    state = tiny_state(model, tx)
    step = jax.jit(lambda s: steps.train_step(s, tiny_batch(), 0.5, jax.random.PRNGKey(1), model=model, tx=tx)[0])
    new_state = step(state)
    newer_state = step(new_state)
    flat_old = dict(jax.tree_util.tree_leaves_with_path(state.params))
    flat_newer = dict(jax.tree_util.tree_leaves_with_path(newer_state.params))
    for path, new in jax.tree_util.tree_leaves_with_path(new_state.params):
        old = flat_old[path]
        if binax.layers.is_latent_kernel_path(path):
            # Bop's weights are +-1: the first update projects the initial values (up to
            # rounding), the second is exact.
            np.testing.assert_allclose(np.abs(np.asarray(new)), 1.0, rtol=0, atol=1e-7)
            assert set(np.unique(np.asarray(flat_newer[path]))) <= {-1.0, 1.0}, path
        else:
            grad_step = np.asarray(old) - np.asarray(new)
            assert np.any(grad_step != 0), path  # SGD moved them, not onto +-1
            assert not set(np.unique(np.asarray(new))) <= {-1.0, 1.0}, path


def test_bop_on_every_parameter_is_rejected():
    with pytest.raises(ValueError, match="binary_optimizer.name='bop'"):
        train.create_optimizer(spec(name="bop"), steps_per_epoch=10, num_epochs=1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(name="adagrad"), "adagrad"),
        (dict(schedule="exponential"), "exponential"),
        (dict(schedule="step", step_epochs=()), "step_epochs"),
        (dict(warmup_epochs=5.0), "warmup_epochs=5.0"),
        (dict(name="nesterov", momentum=0.0), "momentum"),
    ],
)
def test_bad_optimizer_specs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        train.create_optimizer(spec(**kw), steps_per_epoch=10, num_epochs=2)


# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_with_warmup_matches_the_formula():
    peak, spe, epochs, warm = 0.4, 10, 5, 1.0
    sched = train.make_schedule(
        peak, spec(schedule="cosine", warmup_epochs=warm, end_factor=0.1), steps_per_epoch=spe, num_epochs=epochs
    )
    total, w = spe * epochs, int(warm * spe)
    for count in (0, 5, 10, 20, 33, 49, 50):
        if count < w:
            expected = peak * count / w
        else:
            frac = min((count - w) / (total - w), 1.0)
            expected = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        assert float(sched(count)) == pytest.approx(expected, rel=1e-5, abs=1e-8), count


def test_step_and_linear_schedules():
    step = train.make_schedule(
        1.0, spec(schedule="step", step_epochs=(2, 4), step_factor=0.1), steps_per_epoch=10, num_epochs=6
    )
    assert [float(step(c)) for c in (0, 19, 20, 39, 40, 59)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    linear = train.make_schedule(2.0, spec(schedule="linear", end_factor=0.5), steps_per_epoch=10, num_epochs=2)
    assert [float(linear(c)) for c in (0, 10, 20)] == pytest.approx([2.0, 1.5, 1.0])


def test_progress_per_epoch_and_per_step():
    kw = dict(steps_per_epoch=10, num_epochs=4)
    per_epoch = [float(train.progress_at(s, unit="epoch", **kw)) for s in (0, 9, 10, 25, 40)]
    per_step = [float(train.progress_at(s, unit="step", **kw)) for s in (0, 9, 10, 25, 40)]
    assert per_epoch == pytest.approx([0.0, 0.0, 0.25, 0.5, 1.0])
    assert per_step == pytest.approx([0.0, 0.225, 0.25, 0.625, 1.0])
    with pytest.raises(ValueError, match="'batch'"):
        train.progress_at(0, unit="batch", **kw)


def test_one_epoch_of_per_epoch_progress_warns_that_schedules_stay_put():
    with pytest.warns(UserWarning, match="progress stays 0"):
        assert train.progress_at(9, steps_per_epoch=10, num_epochs=1, unit="epoch") == 0.0
    # Per step, the same run's schedule moves.
    assert train.progress_at(9, steps_per_epoch=10, num_epochs=1, unit="step") == pytest.approx(0.9)


# ----------------------------------------------------------------------------- steps


def test_train_step_is_traced_once_while_progress_changes():
    model = tiny_model()
    tx = optax.adam(1e-3)
    state = tiny_state(model, tx)
    step_fn = jax.jit(chex.assert_max_traces(lambda s, b, p, r: steps.train_step(s, b, p, r, model=model, tx=tx), n=1))
    batch = tiny_batch()
    losses = []
    for i, p in enumerate([0.0, 0.25, 0.5, 1.0]):
        state, m = step_fn(state, batch, jnp.float32(p), jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
    assert int(state.step) == 4 and all(map(math.isfinite, losses))


def test_progress_reaches_the_binarizers_backward():
    # EDE's backward depends on t(progress): the same state and batch at two progress
    # values must give different gradients (the forward, sign, is the same).
    model = tiny_model()
    tx = optax.sgd(1.0)
    state = tiny_state(model, tx)
    batch = tiny_batch()
    step = jax.jit(lambda p: steps.train_step(state, batch, p, jax.random.PRNGKey(0), model=model, tx=tx)[1])
    early, late = step(jnp.float32(0.0)), step(jnp.float32(1.0))
    assert float(early["loss"]) == float(late["loss"])
    assert float(early["grad_norm"]) != pytest.approx(float(late["grad_norm"]), rel=1e-3)


def test_latent_weight_clip_clips_only_latent_kernels():
    model = tiny_model()
    tx = optax.sgd(10.0)  # a big step pushes weights well past the clip
    state = tiny_state(model, tx)
    new_state, _ = jax.jit(
        lambda s: steps.train_step(s, tiny_batch(), 0.0, jax.random.PRNGKey(0), model=model, tx=tx, latent_weight_clip=0.01)
    )(state)
    beyond = []
    for path, w in jax.tree_util.tree_leaves_with_path(new_state.params):
        big = float(jnp.max(jnp.abs(w)))
        if binax.layers.is_latent_kernel_path(path):
            assert big <= 0.01, path
        else:
            beyond.append(big > 0.01)
    assert any(beyond)  # the float layers were not clipped


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights():
    model = tiny_model()
    tx = optax.adam(1e-3)
    state = tiny_state(model, tx)
    batch = tiny_batch(16)
    rng = jax.random.PRNGKey(0)
    run = jax.jit(
        lambda dtype: steps.train_step(state, batch, 0.5, rng, model=model, tx=tx, compute_dtype=dtype),
        static_argnums=0,
    )
    s32, m32 = run(jnp.float32)
    s16, m16 = run(jnp.bfloat16)
    for tree in (s16.params, s16.batch_stats, s16.opt_state):
        assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(tree))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=0.05)
    assert float(m16["loss"]) != float(m32["loss"])  # the forward did run in bfloat16


def test_evaluation_ignores_padded_rows():
    model = tiny_model()
    state = tiny_state(model, optax.adam(1e-3))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batch = tiny_batch(6)
    padded = {k: np.concatenate([v, v[:2] * 0 + 7]) for k, v in batch.items()}
    padded["mask"] = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    full = {**batch, "mask": np.ones(6, np.float32)}
    a, b = train.evaluate(model, variables, [padded]), train.evaluate(model, variables, [full])
    twice = train.evaluate(model, variables, [full, padded])
    assert (a.count, b.count, twice.count) == (6, 6, 12)
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.accuracy == b.accuracy == twice.accuracy
    assert twice.loss == pytest.approx(b.loss, rel=1e-6)


# ----------------------------------------------------------------------------- metrics


def test_metrics_writer_resume_drops_records_after_the_checkpoint(tmp_path):
    w = train.MetricsWriter(str(tmp_path))
    for s in range(1, 6):
        w.write(s, {"train/loss": 1.0 / s})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a record torn by SIGKILL
    w = train.MetricsWriter(str(tmp_path), resume_step=3)
    w.write(4, {"train/loss": 0.5})
    w.close()
    records = train.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train/loss"] == 0.5


# ----------------------------------------------------------------------------- the loop


def small_config(**flat):
    c = digits_mlp.get_config()
    c.model.widths = (32, 32)
    c.num_epochs = 1
    c.batch_size = 300
    c.log_every_steps = 1
    for key, value in flat.items():
        c.update_from_flattened_dict({key: value})
    return c


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'fashion_mnistt'"):
        train.train_and_evaluate(small_config(**{"data.name": "fashion_mnistt"}), str(tmp_path))


def test_bad_batch_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="batch_size=0"):
        train.train_and_evaluate(small_config(batch_size=0), str(tmp_path))


@pytest.mark.slow
def test_non_finite_parameters_stop_the_run_although_the_loss_is_finite(tmp_path, monkeypatch):
    # A NaN step size makes every parameter NaN in update 0, whose loss (computed before
    # the update) is finite; a binary network's loss can stay finite on NaN latent
    # weights for a long time. The run stops at step 1, before any record or checkpoint
    # holds the NaN state. (A NaN learning_rate in the config is refused before the run:
    # the schedule is patched to produce one.)
    config = small_config(**{"optimizer.schedule": "constant"})
    monkeypatch.setattr(optimizers, "make_schedule", lambda *args, **kwargs: lambda count: jnp.nan)
    with pytest.raises(
        train.NonFiniteError, match=r"loss is [0-9.]+ but update_norm is nan, param_norm is nan at step 1 .*none saved yet"
    ):
        train.train_and_evaluate(config, str(tmp_path))
    assert train.read_metrics(str(tmp_path / "metrics.jsonl")) == []
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    # Checkpoints every 2 steps; the learning rate jumps to inf at step 3 (warm-up
    # schedules don't do that, a bad config can): the checkpoint to go back to is step 2.
    config = small_config(
        **{"checkpoint.every_steps": 2, "checkpoint.async_save": False, "log_every_steps": 3}
    )
    config.optimizer.learning_rate = 1e-3
    original = optimizers.make_schedule

    def exploding(*args, **kwargs):
        schedule = original(*args, **kwargs)
        return lambda count: jnp.where(count >= 2, jnp.inf, schedule(count))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optimizers, "make_schedule", exploding)
        with pytest.raises(train.NonFiniteError, match=r"at step 3 \(update 2\); the last checkpoint to go back to is step 2 in "):
            train.train_and_evaluate(config, str(tmp_path))
    assert train.read_metrics(str(tmp_path / "metrics.jsonl")) == []  # the record at step 3 was not written


@pytest.mark.slow
def test_short_run_writes_records_summary_and_best_checkpoint(tmp_path):
    config = small_config(num_epochs=2, log_every_steps=2)
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = train.read_metrics(str(tmp_path / "metrics.jsonl"))
    # 5 steps per epoch: records every 2 steps and at each epoch end (+ its eval record).
    assert [r["step"] for r in records] == [2, 4, 5, 5, 6, 8, 10, 10]
    train_rec = records[0]
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/param_norm", "learning_rate", "flip_ratio"):
        assert math.isfinite(train_rec[key]), key
    assert 0.0 <= train_rec["flip_ratio"] <= 1.0
    evals = [r for r in records if "test/accuracy" in r]
    assert summary["test_accuracy"] == evals[-1]["test/accuracy"]
    with open(tmp_path / "final.json") as f:
        assert json.load(f)["step"] == 10
    best = train.Checkpoints(str(tmp_path / "checkpoints"))
    best_eval = max(evals, key=lambda r: r["test/accuracy"])
    assert best.best_step() == best_eval["step"]
    best.close()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_a_rerun_resumes_there(tmp_path):
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach only the main thread")

    def interrupt(step, state, metrics):
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    config = small_config(**{"checkpoint.async_save": False})
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path), hooks=[interrupt])
    # The loop stops after the update in progress when the signal came, and saves it.
    ckpts = train.Checkpoints(str(tmp_path / "checkpoints"))
    assert ckpts.all_steps() == [3]
    ckpts.close()
    seen = []

    def probe(step, state, metrics):  # a user's probe: sees the state and metrics of every update
        seen.append((step, int(state.step), None if metrics is None else float(metrics["loss"])))

    summary = train.train_and_evaluate(config, str(tmp_path), hooks=[probe])
    assert (summary["resumed_from_step"], summary["step"]) == (3, 5)
    records = train.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 5]
    # Called at the resumed state (no update yet: metrics None), then after updates 4 and 5
    # with their state and loss (records every step: each record is that update's loss).
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert [(step, at) for step, at, _ in seen] == [(3, 3), (4, 4), (5, 5)]
    assert seen[0][2] is None
    assert [loss for _, _, loss in seen[1:]] == pytest.approx([losses[4], losses[5]], rel=1e-6)


# ----------------------------------------------------------------------------- what a run logs


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("logged")
    train.train_and_evaluate(small_config(num_epochs=2, log_every_steps=2), str(workdir))
    return workdir


@pytest.mark.slow
def test_tensorboard_holds_the_config_hparams_flip_ratios_and_latent_weight_histograms(logged_run):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logged_run / "tb"), size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "test/accuracy", "flip_ratio", "flip_ratio/fc1"} <= set(tags["scalars"])
    # One latent-weight histogram per binary layer at each epoch end.
    assert [e.step for e in acc.Histograms("latent_weights/fc1")] == [5, 10]
    histogram = acc.Histograms("latent_weights/fc1")[-1].histogram_value
    assert histogram.num == 32 * 32
    # ... and of what each sign binarizes (fc1's input: ede_sign), on 256 fixed test images.
    assert [e.step for e in acc.Histograms("pre_activations/fc1")] == [5, 10]
    assert acc.Histograms("pre_activations/fc1")[-1].histogram_value.num == 256 * 32
    assert not [t for t in tags["histograms"] if t.startswith("pre_activations/") and t != "pre_activations/fc1"]
    # EDE's t and k as scalars at every record, the schedule's values at the record's progress.
    records = [r for r in train.read_metrics(str(logged_run / "metrics.jsonl")) if "progress" in r]
    for name in ("ede_sign", "libra_pb"):
        t_events = acc.Scalars(f"schedule/{name}/t")
        assert [e.step for e in t_events] == [r["step"] for r in records] and len(records) >= 4
        for event, record in zip(t_events, records):
            t, k = binarizers.ede_params(record["progress"], t_min=0.1, t_max=10.0)
            assert event.value == pytest.approx(float(t), rel=1e-5)
            assert record[f"schedule/{name}/k"] == pytest.approx(float(k), rel=1e-5)
        assert t_events[0].value < t_events[-1].value  # t grows over training
    # The config as text, and as hparams for TensorBoard's HParams tab.
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"widths": [\n      32,\n      32\n    ]' in config_text
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"optimizer.learning_rate" in plugins["_hparams_/session_start_info"]


@pytest.mark.slow
def test_per_layer_flip_ratios_average_to_the_total(logged_run):
    record = train.read_metrics(str(logged_run / "metrics.jsonl"))[0]
    layers_ = {k: v for k, v in record.items() if k.startswith("flip_ratio/")}
    assert list(layers_) == ["flip_ratio/fc1"]  # the only binary kernel of this MLP
    assert record["flip_ratio"] == pytest.approx(layers_["flip_ratio/fc1"])


def test_update_flip_ratios_count_sign_changes_per_layer():
    old = {"a": {"latent_kernel": jnp.array([1.0, -1.0, 0.0, 2.0])}, "b": {"latent_kernel": jnp.ones((2, 3))},
           "c": {"kernel": jnp.ones(3)}}
    new = {"a": {"latent_kernel": jnp.array([-1.0, -1.0, -0.1, 2.0])}, "b": {"latent_kernel": -jnp.ones((2, 3))},
           "c": {"kernel": -jnp.ones(3)}}
    ratios = jax.jit(steps.update_flip_ratios)(old, new)
    assert float(ratios["flip_ratio/a"]) == 0.5  # 0 -> -0.1 is a flip: sign(0) = +1
    assert float(ratios["flip_ratio/b"]) == 1.0
    assert float(ratios["flip_ratio"]) == pytest.approx(8 / 10)
    assert "flip_ratio/c" not in ratios  # a float kernel


@pytest.mark.slow
def test_plot_draws_every_run_and_names_missing_metrics(logged_run, tmp_path):
    import matplotlib.image

    from binax.errors import ConfigError
    from experiments import plot

    out = plot.plot([str(logged_run), str(logged_run)], str(tmp_path / "c.png"), ["train/loss", "test/accuracy", "flip_ratio"])
    image = matplotlib.image.imread(out)
    assert image.shape[1] > image.shape[0] > 100  # three panels side by side
    with pytest.raises(ConfigError, match=r"no run has the metric\(s\) \['train/lost'\]; available: .*train/loss"):
        plot.plot([str(logged_run)], str(tmp_path / "d.png"), ["train/lost"])
