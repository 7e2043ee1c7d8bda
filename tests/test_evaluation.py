"""binax.train.evaluate: the one evaluation (training loop, recipes, mismatch, export check)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from binax import models
from binax.train import array_batches, evaluate, evaluation, steps


@pytest.fixture(scope="module")
def mlp():
    model = models.create("bnn_mlp", widths=(16, 16))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(25, 28, 28, 1)).astype(np.float32))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x[:1])
    _, stats = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    labels = np.random.default_rng(1).integers(0, 10, 25).astype(np.int32)
    return model, {"params": variables["params"], **stats}, np.asarray(x), labels


def test_loss_accuracy_and_logits_are_the_eval_forwards(mlp):
    model, variables, x, labels = mlp
    got = evaluate(model, variables, array_batches(x, labels, batch_size=10), keep_logits=True)
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False, progress=1.0))(variables, x))
    assert got.count == 25 and got.logits.shape == (25, 10)  # the padding of the last batch is dropped
    np.testing.assert_allclose(got.logits, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.accuracy == pytest.approx(np.mean(want.argmax(-1) == labels))
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(want), jnp.asarray(labels))
    assert got.loss == pytest.approx(float(jnp.mean(ce)), rel=1e-5)
    # Top-5: the label among the 5 largest of the 10 logits.
    top5 = np.mean([label in np.argsort(-row)[:5] for row, label in zip(want, labels)])
    assert 0 < top5 < 1 and got.top5_accuracy == pytest.approx(top5)
    assert got.metrics() == {"test/loss": got.loss, "test/accuracy": got.accuracy, "test/top5_accuracy": got.top5_accuracy}


def test_top5_is_left_out_with_five_classes_or_fewer():
    logits = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0]])
    sums = steps.eval_sums(logits, jnp.asarray([0]), jnp.ones(1))
    assert "correct_top5" not in sums
    six = steps.eval_sums(jnp.asarray([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]] * 2), jnp.asarray([0, 1]), jnp.ones(2))
    assert float(six["correct_top5"]) == 1.0  # label 0 is 6th of 6, label 1 is 5th


def test_without_labels_and_compiled_once(mlp):
    model, variables, x, _ = mlp
    got = evaluate(model, variables, array_batches(x, batch_size=8), keep_logits=True, compute_dtype="float32")
    assert got.count == 25 and np.isnan(got.accuracy) and np.isnan(got.loss) and got.labels is None
    before = evaluation._eval_batch._cache_size()
    again = evaluate(models.create("bnn_mlp", widths=(16, 16)), variables, array_batches(x, batch_size=8), keep_logits=True)
    assert evaluation._eval_batch._cache_size() == before  # an equal model reuses the compilation
    np.testing.assert_array_equal(again.logits, got.logits)
