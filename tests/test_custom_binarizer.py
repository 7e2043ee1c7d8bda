"""A user's binarizer, registered in the user's own module (docs/custom_binarizer.md), is
counted, trained, exported and measured like a built-in one. The module and the usage
snippet are the page's own code blocks, so the page cannot rot."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import binax
import binax.export as bx
from binax import binarizers, mismatch, models, ops

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "custom_binarizer.md"
WIDTHS = (64, 64, 64)


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The page's module, written as ``my_binarizers.py`` and imported (it registers ``poly_sign``)."""
    directory = tmp_path_factory.mktemp("plugin")
    (directory / "my_binarizers.py").write_text(python_blocks()[0])
    sys.path.insert(0, str(directory))
    try:
        import my_binarizers

        yield directory, my_binarizers
    finally:
        sys.path.remove(str(directory))


def test_the_page_has_the_module_and_the_usage():
    blocks = python_blocks()
    assert len(blocks) == 2
    assert 'binarizers.register("poly_sign", poly_sign, bits=1, forward="sign")' in blocks[0]


def test_the_usage_snippet_runs_and_says_what_it_promises(plugin, capsys):
    directory, _ = plugin
    exec(compile(python_blocks()[1], str(DOC), "exec"), {})
    out = capsys.readouterr().out
    assert "1 sign" in out and "True" in out
    assert "2 of 2 quantized layers run on XOR-popcount." in out


def test_forward_is_sign_and_backward_is_the_written_out_estimator(plugin):
    _, mine = plugin
    x = jnp.asarray(np.linspace(-1.5, 1.5, 61, dtype=np.float32))
    g = jnp.asarray(np.random.default_rng(0).normal(size=61).astype(np.float32))
    np.testing.assert_array_equal(mine.poly_sign(x), np.where(np.asarray(x) >= 0, 1.0, -1.0))
    for width in (1.0, 0.5):
        _, vjp = jax.vjp(lambda v: mine.poly_sign(v, width), x)
        u = np.asarray(x, np.float64) / width
        want = np.asarray(g) * 1.5 / width * np.maximum(0.0, 1.0 - u * u)
        np.testing.assert_allclose(vjp(g)[0], want, rtol=1e-6, atol=1e-6)


def test_descriptor_by_name_function_and_module_attribute(plugin):
    _, mine = plugin
    q = binarizers.describe("poly_sign")
    assert (q.name, q.bits, q.forward, q.fn) == ("poly_sign", 1, "sign", mine.poly_sign)
    assert binarizers.describe(mine.poly_sign) is q
    assert binarizers.describe("my_binarizers:poly_sign") is q
    assert binarizers.get("my_binarizers:poly_sign") is mine.poly_sign
    assert "poly_sign" in binarizers.names()
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        binarizers.describe("my_binarizers:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        binarizers.describe("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="--import"):
        binarizers.describe("poly_sgn")


def test_counted_one_bit_by_the_summary(plugin):
    mine = binax.summary(models.create("bnn_mlp", widths=WIDTHS, input_quantizer="poly_sign"), (28, 28, 1))
    builtin = binax.summary(models.create("bnn_mlp", widths=WIDTHS, input_quantizer="ste_sign"), (28, 28, 1))
    assert mine.binary_macs == builtin.binary_macs == 2 * 64 * 64
    assert mine.totals == builtin.totals
    assert mine.layer("fc1").input_bits == 1


def _loss_jaxpr(model, x):
    """The training step's forward and backward, as a jaxpr (nothing is compiled or run)."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def grads(variables):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits)

        return jax.grad(loss)(variables["params"])

    return str(jax.make_jaxpr(grads)(variables))


def test_trains_on_the_xnor_popcount_fast_path(plugin, monkeypatch):
    _, mine = plugin
    monkeypatch.setattr(ops.binary, "default_impl", lambda backend=None: "xnor")
    assert ops.fast_path_supported("poly_sign", "ste_sign")
    assert ops.fast_path_supported("my_binarizers:poly_sign", "xnor_weight")
    x = jnp.zeros((2, 28, 28, 1))
    assert "population_count" in _loss_jaxpr(models.create("bnn_mlp", widths=WIDTHS, input_quantizer="poly_sign"), x)
    # The same function, undeclared (a plain callable): its values are unknown, so no fast path.
    undeclared = models.create("bnn_mlp", widths=WIDTHS, input_quantizer=lambda v: mine.poly_sign(v))
    assert "population_count" not in _loss_jaxpr(undeclared, x)


def _trained_like(model, x):
    """Variables with non-trivial batch statistics (one train-mode pass)."""
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
    _, stats = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    return {"params": variables["params"], **stats}


def test_exports_packed_and_equals_the_training_graph(plugin, tmp_path):
    config = {"widths": WIDTHS, "input_quantizer": "poly_sign", "input_quantizer_kwargs": {"width": 0.5}}
    model = models.create("bnn_mlp", **config)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 28, 28, 1)).astype(np.float32))
    variables = _trained_like(model, x)
    packed = bx.export(model, variables, preprocessing=None, input_shape=(28, 28, 1))
    assert all(layer.packed for layer in packed.layers.values()) and len(packed.layers) == 2  # fc1, fc2
    want = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(packed(x), want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    packed.save(tmp_path / "m.npz")
    np.testing.assert_array_equal(bx.load(tmp_path / "m.npz")(x), packed(x))


def test_the_mismatch_study_measures_it_against_the_sign_network(plugin):
    ref = mismatch.deployed_forward({"input_quantizer": "poly_sign", "input_quantizer_kwargs": {"width": 2.0}}, "bnn_mlp")
    assert (ref["input_quantizer"], ref["input_quantizer_kwargs"]) == ("sign", {})


def test_register_needs_bits_and_an_explicit_overwrite(plugin):
    _, mine = plugin
    with pytest.raises(TypeError, match="bits"):
        binarizers.register("poly_sign_2", mine.poly_sign)  # noqa  (bits is required)
    # The same descriptor again (a module imported twice) is not an error ...
    assert binarizers.register("poly_sign", mine.poly_sign, bits=1, forward="sign") is not None
    # ... another function under a taken name is, unless overwrite=True.
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        binarizers.register("poly_sign", binarizers.sign, bits=1, forward="sign")
    q = binarizers.register("_test_overwritten", binarizers.sign, bits=1, forward="sign")
    q2 = binarizers.register("_test_overwritten", binarizers.ste_sign, bits=1, forward="sign", overwrite=True)
    assert binarizers.describe("_test_overwritten") is q2 and q2 != q
    with pytest.raises(ValueError, match="forward='soft' is not one of"):
        binarizers.register("_test_bad", binarizers.sign, bits=1, forward="soft")
    with pytest.raises(ValueError, match="bits must be an int >= 1"):
        binarizers.register("_test_bad", binarizers.sign, bits=0)
    with pytest.raises(ValueError, match="levels=.*forward='levels'"):
        binarizers.register("_test_bad", binarizers.sign, bits=1, forward="levels")
    with pytest.raises(ValueError, match="inference='nope'"):
        binarizers.register("_test_bad", binarizers.sign, bits=1, inference="nope")
    assert "_test_bad" not in binarizers.names()


def _workdir(path: Path, input_quantizer: str) -> None:
    """A training run's workdir (config.json and one checkpoint) for experiments.export."""
    import optax

    from binax.train import Checkpoints, TrainState
    from configs import common as config_common

    config = config_common.base_config()
    config.model = config_common.model_config("bnn_mlp", widths=WIDTHS, input_quantizer=input_quantizer)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json_best_effort())
    model = models.create("bnn_mlp", widths=WIDTHS, input_quantizer=input_quantizer)
    variables = _trained_like(model, jnp.asarray(np.random.default_rng(3).normal(size=(16, 28, 28, 1)), jnp.float32))
    state = TrainState(
        step=jnp.asarray(5, jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optax.sgd(0.1).init(variables["params"]),
        rng=jax.random.PRNGKey(0),
    )
    ckpts = Checkpoints(str(path / "checkpoints"))
    ckpts.save(5, state, accuracy=0.5)
    ckpts.close()


def test_a_trained_run_naming_module_attribute_restores_and_exports(plugin, tmp_path):
    """What the export command does with a workdir whose config names ``my_binarizers:poly_sign``."""
    from binax import train

    _workdir(tmp_path, "my_binarizers:poly_sign")
    model, variables, config, step = train.restore_variables(str(tmp_path))
    assert step == 5 and binarizers.describe(model.input_quantizer).name == "poly_sign"
    packed = bx.export(model, variables, preprocessing=bx.Preprocessing.from_config(config))
    assert all(layer.packed for layer in packed.layers.values())
    assert packed.meta["config"]["input_quantizer"] == "poly_sign"  # the file names the registry name, no module
    assert packed.preprocessing.dataset == "fashion_mnist"


@pytest.mark.slow
def test_export_command_imports_the_module_or_the_module_attribute(plugin, tmp_path):
    directory, _ = plugin
    _workdir(tmp_path, "poly_sign")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "experiments.export", "--workdir", str(tmp_path), "--check", "4"]
    missing = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode != 0 and "Unknown binarizer 'poly_sign'" in missing.stderr + missing.stdout
    done = subprocess.run(command + ["--import", "my_binarizers"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 of 2 quantized layers run on XOR-popcount." in done.stdout
    assert "predictions agree 100%" in done.stdout
    # A config naming "module:function" is data too: the module is not imported by the
    # name the file gives; --import does it, and then the registered function is found.
    by_name = tmp_path / "by_name"
    _workdir(by_name, "my_binarizers:poly_sign")
    command[command.index(str(tmp_path))] = str(by_name)
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "never imports or calls what a file names" in refused.stderr.strip().splitlines()[-1]
    done = subprocess.run(command + ["--import", "my_binarizers"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 of 2 quantized layers run on XOR-popcount." in done.stdout


@pytest.mark.parametrize("spec", ["evil_module_binax_test:sign", "os:system", "builtins:exec", "not_registered_name"])
def test_a_workdir_config_naming_code_is_refused_and_nothing_runs(spec, tmp_path, monkeypatch):
    """config.json is data: restore_variables never imports or calls what it names."""
    from binax import train

    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil_module_binax_test.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\nsign = lambda x, **k: x\n"
    )
    monkeypatch.syspath_prepend(str(evil))
    _workdir(tmp_path / "w", "ste_sign")
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    config["model"]["input_quantizer"] = spec
    (tmp_path / "w" / "config.json").write_text(json.dumps(config))
    with pytest.raises(binax.errors.ConfigError, match="input_quantizer") as raised:
        train.restore_variables(str(tmp_path / "w"))
    assert str(tmp_path / "w" / "config.json") in str(raised.value)
    assert not sentinel.exists() and "evil_module_binax_test" not in sys.modules


@pytest.mark.slow
def test_run_command_imports_the_module_that_registers_the_binarizer(plugin, tmp_path):
    directory, _ = plugin
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(directory), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "experiments.run", "--config", str(ROOT / "configs" / "recipe.py") + ":method=bnn,quick",
               "--workdir", str(tmp_path / "w"), "--config.model.input_quantizer=poly_sign",
               "--config.data.name=digits", "--config.data.validation_holdout=0",  # the recipes hold out 10,000
               "--config.max_steps_per_epoch=3", "--config.eval_batch_size=297"]
    missing = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: Unknown binarizer 'poly_sign'")
    done = subprocess.run(command + ["--import", "my_binarizers"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "w" / "config.json") as f:
        assert json.load(f)["model"]["input_quantizer"] == "poly_sign"
