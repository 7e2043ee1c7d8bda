"""The packed model file is data: loading never imports or calls what a file names, a
binarizer of the user's own loads from its recorded declaration, and every damaged or
foreign file is one ``PackedFileError`` line naming the file and what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import jax
import numpy as np
import pytest

import binax
import binax.export as bx
from binax import quantizer as quantizer_registry
from binax.errors import BinaxError, PackedFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (40, 36, 34)  # fc1 and fc2 binary, bn1 between them fused into thresholds


@pytest.fixture(scope="module")
def packed():
    """A small bnn_mlp exported with Fashion-MNIST's preprocessing (random weights)."""
    model = binax.models.create("bnn_mlp", widths=WIDTHS)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(np.zeros((1, 28, 28, 1), np.float32))
    return bx.export(model, jax.tree.map(np.asarray, variables), preprocessing="fashion_mnist")


def write_npz(path, meta, arrays) -> str:
    """A file as an attacker or a broken tool would write it: any meta, any arrays."""
    np.savez(path, meta=np.asarray(json.dumps(meta)), **arrays)
    return str(path)


def assert_one_line(err: pytest.ExceptionInfo, path) -> str:
    message = str(err.value)
    assert isinstance(err.value, BinaxError) and "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# ------------------------------------------------------------------------- defect 1: no code runs


@pytest.fixture
def trap(tmp_path, monkeypatch):
    """(sentinel path, module name): importing the module, or running the shell command
    the malicious files carry, creates the sentinel."""
    sentinel = tmp_path / "SENTINEL"
    (tmp_path / "binax_trap_mod.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef f(*a, **k):\n    return a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("binax_trap_mod", None)
    yield sentinel, "binax_trap_mod"
    sys.modules.pop("binax_trap_mod", None)


def malicious(packed, sentinel, trap_module):
    """{case: (meta changes, config changes)} that name code to run or import."""
    shell = {"args": f"touch {sentinel}", "shell": True}
    return {
        "subprocess_run": ({"model": None, "module": "subprocess:run", "model_class": "run"}, shell, None),
        "os_system": ({"model": None, "module": "os:system"}, {"command": f"touch {sentinel}"}, None),
        "builtins_exec": ({"model": None, "module": "builtins:exec"}, {"source": f"open({str(sentinel)!r}, 'w')"}, None),
        "module_import": ({"model": None, "module": f"{trap_module}:f"}, {}, None),
        "model_as_path": ({"model": f"{trap_module}:f"}, None, None),
        "quantizer_os_system": ({}, {"input_quantizer": "os:system", "kernel_quantizer": "os:system"}, None),
        "quantizer_import": ({}, {"input_quantizer": f"{trap_module}:f", "input_quantizer_kwargs": shell}, None),
        "kernel_quantizer_import": ({}, {"kernel_quantizer": f"{trap_module}:f"}, None),
        "code_quantizer_import": ({}, None, f"{trap_module}:f"),
    }


CASES = list(malicious(None, "S", "m"))


@pytest.mark.parametrize("case", CASES)
def test_loading_a_malicious_file_runs_and_imports_nothing(packed, trap, tmp_path, case):
    sentinel, trap_module = trap
    meta_changes, config, code_quantizer = malicious(packed, sentinel, trap_module)[case]
    meta = json.loads(json.dumps(packed.meta))
    meta.update(meta_changes)
    if config is not None:
        meta["config"] = {**meta["config"], **config} if meta.get("model") else config
        for key in ("input_quantizer", "kernel_quantizer"):
            if key in config and key in meta.get("quantizers", {}):
                meta["quantizers"][key]["name"] = config[key]
    if code_quantizer is not None:
        meta["layers"]["fc1"]["info"]["code"]["quantizer"] = code_quantizer
    path = write_npz(tmp_path / f"{case}.npz", meta, packed.arrays())
    with pytest.raises(PackedFileError) as err:
        bx.load(path)
    message = assert_one_line(err, path)
    assert not sentinel.exists(), f"loading {case} ran code"
    assert trap_module not in sys.modules, f"loading {case} imported {trap_module}"
    assert any(s in message for s in ("class of your own", "registry name", "not in binax.models' registry")), message


def test_read_meta_of_a_malicious_file_imports_nothing(packed, trap, tmp_path):
    sentinel, trap_module = trap
    meta = {**packed.meta, "model": None, "module": f"{trap_module}:f"}
    path = write_npz(tmp_path / "m.npz", meta, packed.arrays())
    assert bx.read_meta(path)["model"] is None and not sentinel.exists() and trap_module not in sys.modules


# ------------------------------------------------------------------------- a binarizer of the user's own

PLUGIN = '''
import jax.numpy as jnp
from binax import binarizers


def my_sign(x, width=1.0):
    return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def my_levels(x):
    return jnp.round(jnp.clip(x, 0.0, 1.0) * 3) / 3


def my_scaled(w):
    return jnp.where(w >= 0, 1.0, -1.0) * jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)))


binarizers.register("my_sign_t19", my_sign, bits=1, forward="sign")
binarizers.register("my_levels_t19", my_levels, bits=2, forward="levels", levels=(0.0, 1 / 3, 3), binary_planes=3)
binarizers.register("my_scaled_t19", my_scaled, bits=1, forward="scaled_sign")
'''

LOADER = """
import sys, numpy as np
import binax.export as bx
from binax import quantizer as quantizer_registry
from binax.errors import PackedFileError
try:
    model = bx.load(sys.argv[1])
except PackedFileError as e:
    print("REFUSED", e)
    raise SystemExit(0)
np.save(sys.argv[1] + ".out.npy", np.asarray(model(np.load(sys.argv[2]))))
assert "my_plugin_t19" not in sys.modules
print("LOADED", model.report().splitlines()[-1])
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plugin")
    (directory / "my_plugin_t19.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(directory))
    try:
        import my_plugin_t19  # noqa: F401

        yield directory
    finally:
        sys.path.remove(str(directory))


def _load_elsewhere(path, raw, tmp_path):
    np.save(tmp_path / "raw.npy", raw)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}  # the plugin's folder is not on it
    out = subprocess.run(
        [sys.executable, "-c", LOADER, str(path), str(tmp_path / "raw.npy")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_a_custom_binarizers_file_loads_without_its_module_from_its_declared_forward(plugin, tmp_path):
    config = {"widths": WIDTHS, "input_quantizer": "my_plugin_t19:my_sign", "input_quantizer_kwargs": {"width": 0.5},
              "kernel_quantizer": "my_scaled_t19"}
    model = binax.models.create("bnn_mlp", **config)
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(np.zeros((1, 28, 28, 1), np.float32))
    packed = bx.export(model, variables, preprocessing="fashion_mnist")
    assert packed.meta["config"]["input_quantizer"] == "my_sign_t19"  # the registry name, not module:attr
    assert packed.meta["quantizers"]["input_quantizer"]["forward"] == "sign"
    packed.save(tmp_path / "m.npz")
    raw = binax.data.load_arrays("fashion_mnist", "test")[0][:16]
    printed = _load_elsewhere(tmp_path / "m.npz", raw, tmp_path)
    assert printed == "LOADED 2 of 2 quantized layers run on XOR-popcount.", printed
    np.testing.assert_array_equal(np.load(tmp_path / "m.npz.out.npy"), packed(raw))


def test_a_custom_binarizer_whose_forward_is_not_enough_needs_its_module(plugin, tmp_path, monkeypatch):
    model = binax.models.create("bnn_mlp", widths=WIDTHS, input_quantizer="my_levels_t19")
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(np.zeros((1, 28, 28, 1), np.float32))
    path = tmp_path / "l.npz"
    bx.export(model, variables, preprocessing="fashion_mnist").save(path)
    assert bx.load(path).name == "bnn_mlp"  # registered: it loads
    monkeypatch.delitem(quantizer_registry._REGISTRY, "my_levels_t19")  # as in a process without the module
    with pytest.raises(PackedFileError) as err:
        bx.load(path)
    message = assert_one_line(err, path)
    assert message.startswith(f"{path}: input quantizer 'my_levels_t19' is not registered in this process"), message
    assert "import the module that registers it" in message


def test_a_quantizer_registered_differently_than_at_export_is_refused(packed, tmp_path):
    meta = json.loads(json.dumps(packed.meta))
    meta["quantizers"]["input_quantizer"]["forward"] = "scaled_sign"
    path = write_npz(tmp_path / "q.npz", meta, packed.arrays())
    with pytest.raises(PackedFileError) as err:
        bx.load(path)
    assert "registered here with forward 'sign'" in assert_one_line(err, path)


# ------------------------------------------------------------------------- defect 8: one line per failure


def _rewrite(src, dst, *, drop=(), replace=None):
    """Copies the zip ``src`` to ``dst`` without the entries ``drop`` and with ``replace``'s bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            zout.writestr(info.filename, (replace or {}).get(info.filename, zin.read(info)))


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _damage(case, packed, good, path):
    """Writes the damaged file of ``case`` at ``path``."""
    data = open(good, "rb").read()
    meta = json.loads(json.dumps(packed.meta))
    arrays = packed.arrays()
    if case == "not_a_zip":
        open(path, "w").write("this is a text file\n")
    elif case == "a_npy_file":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif case == "missing":
        pass
    elif case == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif case == "flipped_byte":
        info = zipfile.ZipFile(good).getinfo("layers/fc1/bits.npy")
        start = info.header_offset + 30 + len(info.filename) + int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
        offset = start + info.compress_size // 2  # inside the deflated array
        open(path, "wb").write(data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :])
    elif case == "missing_meta":
        _rewrite(good, path, drop=("meta.npy",))
    elif case == "missing_array":
        _rewrite(good, path, drop=("layers/fc1/bits.npy",))
    elif case == "pickled_array":
        _rewrite(good, path, replace={"layers/fc2/alpha.npy": _npy(np.array([{"a": 1}], dtype=object))})
    elif case == "malformed_json":
        _rewrite(good, path, replace={"meta.npy": _npy(np.asarray('{"format": "binax.export.packed_model", '))})
    elif case == "meta_not_an_object":
        write_npz(path, [1, 2], arrays)
    elif case in ("older_version", "newer_version"):
        write_npz(path, {**meta, "format_version": 2 if case == "older_version" else bx.FORMAT_VERSION + 1}, arrays)
    elif case == "missing_meta_field":
        del meta["layers"]
        write_npz(path, meta, arrays)
    elif case == "nan":
        write_npz(path, meta, {**arrays, "variables/params/fc0/kernel": np.full_like(arrays["variables/params/fc0/kernel"], np.nan)})
    elif case == "inf_table":
        table = arrays["preprocessing/table"].copy()
        table[0, 3] = np.inf
        write_npz(path, meta, {**arrays, "preprocessing/table": table})
    elif case == "wrong_dtype":
        write_npz(path, meta, {**arrays, "layers/fc1/bits": arrays["layers/fc1/bits"].astype(np.int64)})
    elif case == "wrong_shape":
        write_npz(path, meta, {**arrays, "variables/batch_stats/bn0/mean": arrays["variables/batch_stats/bn0/mean"][:-1]})
    elif case == "unexpected_array":
        write_npz(path, meta, {**arrays, "layers/fc9/bits": np.zeros(3, np.uint32)})
    elif case == "meta_not_a_string":
        _rewrite(good, path, replace={"meta.npy": _npy(np.zeros(3))})
    elif case == "threshold_dtype":
        write_npz(path, meta, {**arrays, "thresholds/bn1/threshold": arrays["thresholds/bn1/threshold"].astype(np.int64)})
    elif case in META_EDITS:
        META_EDITS[case][0](meta)
        write_npz(path, meta, arrays)
    else:
        raise AssertionError(case)


def _set(*keys_value):
    """An edit of ``meta``: the value at the key path (None deletes it)."""
    *keys, value = keys_value

    def edit(meta):
        node = meta
        for k in keys[:-1]:
            node = node[k]
        if value is None:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return edit


def _edits(*edits):
    return lambda meta: [e(meta) for e in edits]


FC1 = ("layers", "fc1", "info")
#: Metadata a broken or hostile tool could write: {case: (edit, what the error says)}.
META_EDITS = {
    "bad_layout": (_set(*FC1, "layout", "spiral"), "layers['fc1'].info.layout = 'spiral' does not fit the layer's kernel (40, 36)"),
    "wrong_format": (_set("format", "other"), "format 'other' is not 'binax.export.packed_model'"),
    "field_type": (_set("config", []), "metadata field 'config' must be dict; got []"),
    "bad_input_shape": (_set("input_shape", [28, -28, 1]), "input_shape must be a list of positive ints"),
    "bad_runtime": (_set("runtime", "fast"), "runtime 'fast' is not one of ('chain', 'generic')"),
    "chain_without_fused": (_set("fused", None), "the metadata of a chain model needs the object 'fused'"),
    "bad_fused": (_set("fused", "bn1", "producer", ["nope"]), "fused['bn1'] must name its producer and consumer layers"),
    "fused_not_xnor": (_set("layers", "fc2", "kind", "float"), "fused['bn1'] must join two xnor layers"),
    "bad_kind": (_set("layers", "fc1", "kind", "magic"), "layers['fc1'] must be {'kind': one of"),
    "bad_code_step": (_set(*FC1, "code", "step", 0), "layers['fc1'].info.code.step must be a finite number > 0"),
    "bad_code_planes": (_set(*FC1, "code", "planes", 0), "layers['fc1'].info.code.planes must be an int in [1, 64]"),
    "bad_code_kwargs": (_set(*FC1, "code", "kwargs", []), "layers['fc1'].info.code.kwargs must be an object"),
    "unregistered_code": (_set(*FC1, "code", "quantizer", "no_such_q"), "layers['fc1'].info.code.quantizer = 'no_such_q' is not a registered quantizer"),
    "quantizer_record": (_set("quantizers", "input_quantizer", None), "quantizers['input_quantizer'] must record 'ste_sign'"),
    "quantizer_kwargs": (_set("config", "input_quantizer_kwargs", [1]), "config.input_quantizer_kwargs must be an object"),
    "config_unknown_key": (_set("config", "depth", 3), "its config does not build 'bnn_mlp': Unknown config key(s) ['depth']"),
    "bad_preprocessing": (_set("preprocessing", "normalize", "cube"), "its preprocessing record is not valid: normalize='cube'"),
    "unknown_layer": (lambda m: m["layers"].update(fc7=m["layers"]["fc1"]), "layers['fc7'] is not a quantized layer of this bnn_mlp"),
    "in_channels": (_set(*FC1, "in_channels", 41), "layers['fc1'].info.in_channels = 41; the layer has 40"),
    "column_sums": (_set(*FC1, "column_sums_n", 1), "layers['fc1'].info.column_sums_n = 1; the layer has 40 inputs"),
    "map_shape": (_edits(_set(*FC1, "layout", "map"), _set(*FC1, "map_shape", [1, 1, 41])), "map_shape = [1, 1, 41] is not (H, W, C) of the layer's 40 inputs"),
    "pack_axis": (_edits(_set("layers", "fc1", "kind", "float_input"), _set(*FC1, "pack_axis", 5)), "layers['fc1'].info.pack_axis = 5 is not an axis of the kernel (40, 36)"),
    "no_chain_plan": (_set("config", "replicate", 2), "runtime 'chain', but bnn_mlp has no chain plan"),
    "too_small_input": (
        _edits(_set("model", "cnn_small"), _set("config", {}), _set("input_shape", [2, 2, 1])),
        "its model does not take input_shape [2, 2, 1]: VGG needs inputs of at least 4x4 pixels",
    ),
}


FAILURES = {
    "not_a_zip": "not a binax packed model file (not a zip archive",
    "a_npy_file": "not a binax packed model file (not a zip archive",
    "missing": "cannot read the file (No such file or directory)",
    "truncated": "truncated or damaged: its zip directory is missing",
    "flipped_byte": "entry 'layers/fc1/bits' is damaged or truncated",
    "missing_meta": "not a binax packed model file (no 'meta' entry)",
    "missing_array": "missing array 'layers/fc1/bits' (uint32[2, 36])",
    "pickled_array": "entry 'layers/fc2/alpha' is damaged or truncated (Object arrays cannot be loaded",
    "malformed_json": "malformed JSON metadata (Expecting property name enclosed in double quotes at line 1",
    "meta_not_an_object": "the metadata must be a JSON object; got list",
    "older_version": "format version 2 (older than this binax's); this binax reads version 3 only",
    "newer_version": "format version 4 (another than this binax's); this binax reads version 3 only",
    "missing_meta_field": "the metadata lacks the field 'layers'",
    "nan": "array 'variables/params/fc0/kernel' holds 31360 non-finite value(s)",
    "inf_table": "array 'preprocessing/table' holds 1 non-finite value(s)",
    "wrong_dtype": "array 'layers/fc1/bits' is int64[2, 36]; the model needs uint32[2, 36]",
    "wrong_shape": "array 'variables/batch_stats/bn0/mean' is float32[39]; the model needs float32[40]",
    "unexpected_array": "unexpected array(s) ['layers/fc9/bits']",
    "meta_not_a_string": "'meta' must be one JSON string; got float64 of shape (3,)",
    "threshold_dtype": "array 'thresholds/bn1/threshold' is int64[1, 36]; the model needs int32[1, 36]",
    **{case: text for case, (_, text) in META_EDITS.items()},
}


@pytest.fixture(scope="module")
def good_file(packed, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.npz"
    packed.save(path)
    return str(path)


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_damaged_or_foreign_file_is_one_line_naming_the_file_and_the_fault(packed, good_file, tmp_path, case):
    path = str(tmp_path / f"{case}.npz")
    _damage(case, packed, good_file, path)
    with pytest.raises(PackedFileError) as err:
        bx.load(path)
    message = assert_one_line(err, path)
    assert FAILURES[case] in message, message


def test_the_good_file_loads(packed, good_file):
    """The damage above is all that differs: the undamaged file loads and agrees."""
    raw = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    np.testing.assert_array_equal(bx.load(good_file)(raw), packed(raw))


def test_files_are_written_atomically_into_new_folders(packed, tmp_path, monkeypatch):
    path = tmp_path / "new" / "sub" / "m.npz"
    assert packed.save(path) == os.path.getsize(path)
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="No space left"):
        packed.save(path)
    assert open(path, "rb").read() == before  # the old file intact
    assert os.listdir(path.parent) == ["m.npz"]  # no temporary file left behind


# ------------------------------------------------------------------------- defect 9: the artifact and the command


def test_the_artifact_check_fails_only_on_a_real_difference():
    from experiments.export import ARTIFACT_RTOL, compare_logits

    ref = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32) * 5
    noise = ref + np.float32(1e-6) * np.sign(ref)  # what XLA's reordered float sums give
    assert compare_logits(ref, noise)[0]
    assert compare_logits(ref, ref)[0]
    off = ref.copy()
    off[3] += 2 * ARTIFACT_RTOL * np.abs(ref).max()
    ok, text = compare_logits(ref, off)
    assert not ok and "OVER the tolerance" in text
    flipped = ref.copy()
    flipped[5] = ref[5][::-1]
    ok, text = compare_logits(ref, flipped)
    assert not ok and "predictions identical on 15 of 16 images" in text
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_logits(ref, nan)[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training run's workdir: config.json and one checkpoint (step 7, accuracy 0.625)."""
    import optax

    from binax.train import Checkpoints, TrainState
    from configs import common as config_common

    path = tmp_path_factory.mktemp("run")
    config = config_common.base_config()
    config.model = config_common.model_config("bnn_mlp", widths=WIDTHS)
    (path / "config.json").write_text(config.to_json_best_effort())
    model = binax.models.create("bnn_mlp", widths=WIDTHS)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(np.zeros((1, 28, 28, 1), np.float32))
    state = TrainState(
        step=np.int32(7), params=variables["params"], batch_stats=variables["batch_stats"],
        opt_state=optax.sgd(0.1).init(variables["params"]), rng=jax.random.PRNGKey(0),
    )
    ckpts = Checkpoints(str(path / "checkpoints"))
    ckpts.save(7, state, accuracy=0.625)
    ckpts.close()
    return path


def test_the_export_command_stops_when_the_artifact_disagrees(workdir, tmp_path, monkeypatch, capsys):
    from experiments import export as export_cli

    real = jax.export.deserialize

    class Shifted:
        def __init__(self, exported):
            self.exported = exported

        def call(self, x):
            logits = np.asarray(self.exported.call(x))
            return logits + np.float32(1e-3) * np.abs(logits).max() * (np.arange(logits.shape[-1]) == 0)

    monkeypatch.setattr(jax.export, "deserialize", lambda data: Shifted(real(data)))
    with pytest.raises(export_cli.CheckFailed, match=r"disagrees with .*m\.npz: predictions identical on \d+ of 4.*OVER the tolerance"):
        export_cli.run(str(workdir), str(tmp_path / "m.npz"), "best", "auto", None, check=4)
    printed = capsys.readouterr().out
    assert "checkpoint step 7 (best; eval accuracy 62.50% saved with it)" in printed


def _site(packages, directory) -> str:
    """A folder of links to exactly ``packages`` (and their vendored ``<name>.libs``) as
    installed for this interpreter."""
    import importlib.util

    os.makedirs(directory)
    for name in packages:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        source = spec.submodule_search_locations[0]
        os.symlink(source, os.path.join(directory, name))
        libs = source.rstrip(os.sep) + ".libs"
        if os.path.isdir(libs):
            os.symlink(libs, os.path.join(directory, name + ".libs"))
    return str(directory)


ISOLATED = """
import sys
sys.path.insert(0, sys.argv[1])
for name in ("binax", "flax", "optax"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable here")
import numpy as np, jax
exported = jax.export.deserialize(open(sys.argv[2], "rb").read())
np.save(sys.argv[3] + ".out.npy", np.asarray(exported.call(np.load(sys.argv[3]))))
import os, sysconfig
stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
roots = {os.path.realpath(os.path.join(sys.argv[1], n)): n for n in os.listdir(sys.argv[1])}
used = set()
for m in list(sys.modules.values()):
    f = os.path.realpath(getattr(m, "__file__", None) or stdlib)
    if not f.startswith(stdlib):
        used.add(next((n for r, n in roots.items() if f.startswith(r + os.sep)), "OUTSIDE " + f))
print(sorted(used))
"""


def test_the_artifact_runs_with_jax_its_dependencies_and_flatbuffers_alone(packed, tmp_path):
    """``python -I -S`` (no site-packages, no PYTHONPATH) with a path of links to exactly
    the packages docs/export.md names: binax, flax and optax are not importable there."""
    from binax.export import PORTABLE_REQUIREMENTS
    from experiments.export import compare_logits

    packed.save_portable(tmp_path / "m.jaxexport")
    raw = binax.data.load_arrays("fashion_mnist", "test")[0][:32]
    np.save(tmp_path / "raw.npy", raw)
    env = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")}

    def run(packages, site):
        args = [sys.executable, "-I", "-S", "-c", ISOLATED, _site(packages, tmp_path / site), str(tmp_path / "m.jaxexport"), str(tmp_path / "raw.npy")]
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    out = run(PORTABLE_REQUIREMENTS, "site")
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(eval(out.stdout.strip().splitlines()[-1]))  # the linked packages modules came from
    assert "jax" in imported and "flatbuffers" in imported and imported <= set(PORTABLE_REQUIREMENTS), imported
    ok, text = compare_logits(np.asarray(packed(raw)), np.load(tmp_path / "raw.npy.out.npy"))
    assert ok, text
    # flatbuffers is a true requirement (jax does not install it): without it, no artifact.
    missing = run([p for p in PORTABLE_REQUIREMENTS if p != "flatbuffers"], "site_without")
    assert missing.returncode != 0 and "install 'flatbuffers'" in missing.stderr
