"""The packed model file on disk: written atomically, read as data only.

A packed file is a zip of ``.npy`` arrays plus a JSON ``meta`` entry (docs/export.md).
Reading one trusts nothing it says beyond data:

* arrays are parsed by ``numpy.lib.format`` with ``allow_pickle=False`` (no object arrays);
* the model is named by its ``binax.models`` registry name and rebuilt from the registry
  with the file's config; quantizers are named by ``binax.binarizers`` registry name. A
  name that is not registered in this process is never imported: a file cannot make
  binax import a module or call a function it names;
* every array is checked against what the rebuilt model needs (key, dtype, shape, finite
  floats) before any inference runs (:mod:`binax.export.file_arrays`).

Every failure is one :class:`binax.errors.PackedFileError` line naming the file and what
is wrong with it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
import zlib
from typing import Any, Callable, Mapping

import numpy as np

from binax import binarizers, files
from binax.errors import PackedFileError
from binax.quantizer import FORWARDS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "QUANTIZER_KEYS",
    "atomic_write",
    "write",
    "read",
    "check_meta",
    "quantizer_record",
    "loadable_config",
    "check_code",
    "fail",
]

FORMAT = "binax.export.packed_model"
# 2: the module's class and full config, preprocessing, layer order and chain steps.
# 3: the model and its quantizers by registry name only (no importable paths), each
#    quantizer's declared forward recorded (``quantizers``), the class name as text.
FORMAT_VERSION = 3
QUANTIZER_KEYS = ("input_quantizer", "kernel_quantizer")
KINDS = ("xnor", "abc", "float_input", "float")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")  # a registry name: no ':' (never module:attr)


# ------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write_fn: Callable[[io.BufferedWriter], None]) -> int:
    """Writes ``path`` through ``write_fn(file)`` atomically, creating its folder if missing
    (:func:`binax.files.write_with`): a crash leaves the old file or none, never a partial
    one. Returns the size in bytes."""
    return files.write_with(path, write_fn, make_dirs=True)


def write(path: str | os.PathLike, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> int:
    """Writes a packed file (deflate-compressed ``.npz``) atomically; returns its size."""
    entries = {"meta": np.asarray(json.dumps(meta, sort_keys=True))}
    for key, arr in arrays.items():
        if key == "meta":
            raise PackedFileError(f"{path}: 'meta' is reserved for the metadata entry.")
        entries[key] = np.asarray(arr)
    return atomic_write(path, lambda f: np.savez_compressed(f, **entries))


# ------------------------------------------------------------------------- reading


def fail(path, what: str) -> PackedFileError:
    return PackedFileError(f"{os.fspath(path)}: {what}")


def read(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a packed file: the zip opened and every entry parsed as a
    plain ``.npy`` array (no pickles), ``meta`` parsed as JSON (not yet checked)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise fail(path, f"cannot read the file ({e.strerror or e}).") from None
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise fail(path, "truncated or damaged: its zip directory is missing (was the copy cut short?).")
        raise fail(path, "not a binax packed model file (not a zip archive of .npy arrays).")
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                key = info.filename
                if not key.endswith(".npy"):
                    raise fail(path, f"unexpected entry {key!r} (a packed file holds only .npy arrays).")
                key = key[: -len(".npy")]
                try:
                    data = z.read(info)  # checks the entry's CRC-32
                    arrays[key] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
                    raise fail(path, f"entry {key!r} is damaged or truncated ({_one_line(e)}).") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise fail(path, f"truncated or damaged zip ({_one_line(e)}).") from None
    if "meta" not in arrays:
        raise fail(path, "not a binax packed model file (no 'meta' entry).")
    meta = arrays.pop("meta")
    if meta.ndim != 0 or meta.dtype.kind != "U":
        raise fail(path, f"'meta' must be one JSON string; got {meta.dtype} of shape {meta.shape}.")
    try:
        return json.loads(str(meta)), arrays
    except json.JSONDecodeError as e:
        raise fail(path, f"malformed JSON metadata ({e.msg} at line {e.lineno} column {e.colno}).") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ------------------------------------------------------------------------- meta


_META_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str, type(None)),
    "model_class": (str,),
    "config": (dict,),
    "quantizers": (dict,),
    "input_shape": (list,),
    "preprocessing": (dict,),
    "runtime": (str,),
    "layers": (dict,),
}


def check_meta(meta: Any, path) -> dict:
    """``meta`` checked: an object of this format and version with the fields loading reads."""
    if not isinstance(meta, dict):
        raise fail(path, f"the metadata must be a JSON object; got {type(meta).__name__}.")
    if meta.get("format") != FORMAT:
        raise fail(path, f"format {meta.get('format')!r} is not {FORMAT!r} (not a binax packed model file).")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        age = "older" if isinstance(version, int) and version < FORMAT_VERSION else "another"
        raise fail(
            path,
            f"format version {version!r} ({age} than this binax's); this binax reads version {FORMAT_VERSION} only: "
            f"export the model again with this binax (binax.export.export, or python -m experiments.export).",
        )
    for key, types in _META_TYPES.items():
        if key not in meta:
            raise fail(path, f"the metadata lacks the field {key!r}.")
        if not isinstance(meta[key], types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise fail(path, f"metadata field {key!r} must be {want}; got {meta[key]!r:.80}.")
    shape = meta["input_shape"]
    if not shape or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise fail(path, f"input_shape must be a list of positive ints; got {shape!r:.80}.")
    if meta["runtime"] not in ("chain", "generic"):
        raise fail(path, f"runtime {meta['runtime']!r} is not one of ('chain', 'generic').")
    if meta["runtime"] == "chain":
        for key in ("fused", "not_fused"):
            if not isinstance(meta.get(key), dict):
                raise fail(path, f"the metadata of a chain model needs the object {key!r}.")
        for block, entry in meta["fused"].items():
            ok = isinstance(entry, dict) and all(
                isinstance(entry.get(k), list) and "/".join(map(str, entry[k])) in meta["layers"] for k in ("producer", "consumer")
            )
            if not ok:
                raise fail(path, f"fused[{block!r}] must name its producer and consumer layers; got {entry!r:.80}.")
    for key, entry in meta["layers"].items():
        if not isinstance(entry, dict) or entry.get("kind") not in KINDS or not isinstance(entry.get("info"), dict):
            raise fail(path, f"layers[{key!r}] must be {{'kind': one of {KINDS}, 'info': {{...}}}}; got {entry!r:.80}.")
        code = entry["info"].get("code")
        if code is not None:
            check_code(code, f"layers[{key!r}].info.code", path, must_exist=False)
    return meta


def check_code(code: Any, where: str, path, *, must_exist: bool) -> None:
    """An activation code: a quantizer registry name (registered: ``must_exist``), plain
    keywords, finite levels."""
    if not isinstance(code, dict):
        raise fail(path, f"{where} must be an object; got {code!r:.80}.")
    name = code.get("quantizer")
    _registry_name(name, f"{where}.quantizer", path, must_exist=must_exist)
    if not isinstance(code.get("kwargs"), dict):
        raise fail(path, f"{where}.kwargs must be an object; got {code.get('kwargs')!r:.80}.")
    planes = code.get("planes")
    if not (isinstance(planes, int) and not isinstance(planes, bool) and 1 <= planes <= 64):
        raise fail(path, f"{where}.planes must be an int in [1, 64]; got {planes!r:.80}.")
    for k in ("low", "step"):
        v = code.get(k)
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or (k == "step" and v <= 0):
            raise fail(path, f"{where}.{k} must be a finite number{' > 0' if k == 'step' else ''}; got {v!r:.80}.")


def _registry_name(name: Any, where: str, path, *, must_exist: bool) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail(
            path,
            f"{where} = {name!r:.80} is not a quantizer registry name; a packed file names quantizers by "
            f"registry name only (binax.binarizers.names()), never a module path, and loading never imports one.",
        )
    if must_exist and name not in binarizers.names():
        raise fail(path, f"{where} = {name!r} is not a registered quantizer ({', '.join(binarizers.names())}).")


# ------------------------------------------------------------------------- quantizers


def quantizer_record(spec: Any, kwargs: Mapping[str, Any] | None) -> dict:
    """What a file records of a config's quantizer: its registry name and declared forward
    (``forward``, ``levels`` for these keywords, ``inference``)."""
    q = binarizers.describe(spec)
    levels = q.levels_for(kwargs)
    return {
        "name": q.name,
        "forward": q.forward,
        "levels": None if levels is None else list(levels),
        "inference": q.inference,
    }


def loadable_config(meta: Mapping[str, Any], path) -> dict:
    """The config to rebuild the file's model with, every quantizer a registered name.

    A quantizer registered in this process must still declare the forward the file
    records. One that is not (a user's binarizer whose module is not imported) is replaced
    by a built-in whose inference is the same, as far as the recorded declaration
    determines it: a kernel quantizer's values are stored in the file (its function is
    never called at inference), an input quantizer declared ``forward="sign"`` is
    ``sign``, one declared ``inference=NAME`` is ``NAME``. Anything else needs the module
    that registers it, imported by the caller: this is an error naming it.
    """
    config = dict(meta["config"])
    records = meta["quantizers"]
    for key in QUANTIZER_KEYS:
        spec = config.get(key)
        if spec is None:
            continue
        _registry_name(spec, f"config.{key}", path, must_exist=False)
        rec = records.get(key)
        if not (isinstance(rec, dict) and rec.get("name") == spec and rec.get("forward") in FORWARDS):
            raise fail(path, f"quantizers[{key!r}] must record {spec!r} and its declared forward; got {rec!r:.80}.")
        kwargs = config.get(key + "_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise fail(path, f"config.{key}_kwargs must be an object; got {kwargs!r:.80}.")
        if spec in binarizers.names():
            have = quantizer_record(spec, kwargs)
            if (have["forward"], have["levels"]) != (rec["forward"], rec.get("levels")):
                raise fail(
                    path,
                    f"quantizer {spec!r} ({key}) is registered here with forward {have['forward']!r}, levels "
                    f"{have['levels']}, but the file was exported with forward {rec['forward']!r}, levels "
                    f"{rec.get('levels')}: not the same binarizer.",
                )
            continue
        inference = rec.get("inference")
        if key == "kernel_quantizer":
            stand_in = "sign"
        elif isinstance(inference, str) and inference in binarizers.names():
            stand_in = inference
        elif rec["forward"] == "sign":
            stand_in = "sign"
        else:
            raise fail(
                path,
                f"input quantizer {spec!r} is not registered in this process and its declared forward "
                f"{rec['forward']!r} does not determine inference (only 'sign' does); import the module that "
                f"registers it (binax.binarizers.register) before loading: the file never names code to import.",
            )
        config[key], config[key + "_kwargs"] = stand_in, {}
    return config
