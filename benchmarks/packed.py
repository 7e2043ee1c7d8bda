"""Packed XNOR-popcount kernels and packed models vs float32 XLA on this machine.

One run times, interleaved and repeated (median after warm-up), on the same machine:

* the XOR+popcount limit of the CPU as XLA compiles it: a compute-bound loop of
  ``acc += popcount(x ^ c)`` (32 words of ``c`` per loaded word of ``x``, data in L2);
  its word-ops/s (one word-op = 32 binary MACs) turn each packed kernel's work
  (``M·K/32·N`` word-ops) into a lower bound on its time;
* dense ``M×K×N`` (including 128×4096×4096): float32 ``jnp.dot`` vs ``packed_dense``
  for each formulation in ``binax.packed.METHODS``; the float32 GMAC/s of the dot;
* the VGG-small 3×3 SAME convolutions at batch ``--batch``: float32
  ``lax.conv_general_dilated`` vs ``packed_conv``, alone and followed by
  ``threshold_to_bits`` (BatchNorm + sign into the next layer's bits, what a packed
  network runs per layer; the float side is timed without its BatchNorm, which
  flatters float slightly);
* the weight file-size ratio float32 / packed per shape;
* the whole ``--model`` (default ``vgg_small``) at batch ``--batch`` (32×32×3
  Fashion-MNIST images, padded and tiled to 3 channels): the training graph in eval mode,
  jitted, with its binary layers as float32 XLA convolutions (``binax.ops`` forced to
  ``impl="xla"``; on CPU the training graph otherwise runs them through XNOR-popcount,
  timed as ``train_graph_auto``) against ``binax.export`` packed inference; plus the file
  sizes (float32 = every parameter and batch statistic at 4 bytes, the packed ``.npz``
  and its ``jax.export`` artifact).

With ``--lce`` (needs ``binax[lce]``; the interpreter a NumPy 1 Python, ``BINAX_LCE_PYTHON``),
the same ``--model`` exported to Larq Compute Engine (``binax.export.lce``) runs in LCE's
x86 interpreter at batch 1 and 16 with as many threads as XLA's CPU pool (the machine's
cores), beside binax packed and float32 XLA at the same batches (``kind="lce"``). LCE
times come from its worker process after binax's in the same run (not interleaved).
LCE's optimized kernels target ARM (aarch64, ARMv7 NEON); on x86 it runs generic ones.

Every line of output is one JSON object (the last, ``kind="table"``, gathers the figures
of docs/performance.md's packed-inference table). Packed timings start from packed
activations (what a packed network passes between binary layers); ``pack_bits`` of a
float input is timed separately. Ratios are medians of per-round ratios (float time /
packed time in the same round), which the load of other processes distorts less than
ratios of medians; ``cpu_*`` fields use this process's CPU time (all threads), which
hardly grows when other processes share the cores, and are the steadier figure on a busy
machine.

Usage: ``python -m benchmarks.packed [--batch 128] [--reps 7] [--quick] [--sweep]
[--model vgg_small | --model ''] [--model-only] [--lce]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


from binax.packed import (
    CPU_COMPILER_OPTIONS,
    METHODS,
    pack_bits,
    packed_conv,
    packed_dense,
    packed_size_bytes,
    threshold_to_bits,
)
from binax.packed import geometry

SWEEP_GROUP_WORDS = (4, 8, 16, 32)

# Larger intermediates than this (the broadcast formulation's M·K/32·N words) are skipped.
MAX_BROADCAST_BYTES = 1 << 28

VGG_SMALL_CONVS = [  # (H=W, C_in, C_out); 3×3, stride 1, SAME
    (32, 128, 128),
    (16, 128, 256),
    (16, 256, 256),
    (8, 256, 512),
    (8, 512, 512),
]


def emit(**record):
    print(json.dumps(record), flush=True)


def block(x):
    return jax.block_until_ready(x)


def interleaved(cands: dict, reps: int, warmup: int = 1) -> dict:
    """Times every candidate ``reps`` times, round-robin, rotating the order each round.

    Returns ``{name: (wall_seconds, cpu_seconds)}``; CPU time is this process's, summed
    over its threads, so it grows little when other processes take the cores.
    """
    names = list(cands)
    for n in names:
        for _ in range(warmup):
            fn, args = cands[n]
            block(fn(*args))
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            fn, args = cands[n]
            t0, c0 = time.perf_counter(), time.process_time()
            block(fn(*args))
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    return {n: (np.asarray(wall[n]), np.asarray(cpu[n])) for n in names}


def summarize(times: dict, baseline: str) -> dict:
    base_wall, base_cpu = times[baseline]
    out = {}
    for n, (wall, cpu) in times.items():
        out[n] = {
            "median_ms": round(float(np.median(wall)) * 1e3, 3),
            "min_ms": round(float(np.min(wall)) * 1e3, 3),
            "cpu_median_ms": round(float(np.median(cpu)) * 1e3, 3),
            "speedup_vs_float": round(float(np.median(base_wall / wall)), 2),
            "cpu_speedup_vs_float": round(float(np.median(base_cpu / cpu)), 2),
        }
    return out


def jit_cpu(fn):
    """``jax.jit`` with the packed kernels' XLA:CPU options (512-bit vectors) on CPU."""
    opts = CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=opts)


def pm1(rng, shape):
    return jnp.asarray(rng.choice(np.array([-1.0, 1.0], np.float32), size=shape))


# ----------------------------------------------------------------------------- limit


def cpu_model() -> str:
    """The CPU's model name and flags that matter here (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(key)), "?")  # noqa: E731
    flags = field("flags").split()
    have = [f for f in ("avx512f", "avx512_vpopcntdq", "avx512_bf16", "amx_tile") if f in flags]
    return f"{field('model name')} (family {field('cpu family')}, model {field('model')}; {', '.join(have)})"


def measure_limit(reps: int) -> dict:
    """Peak word-ops/s (one op = xor + popcount + add of a uint32) of an XLA-compiled loop."""
    rng = np.random.default_rng(0)
    rows, cols, inner = 64, 8192, 32  # x: 2 MiB (L2), 32 words of c per word of x
    x = jnp.asarray(rng.integers(0, 2**32, size=(rows, cols), dtype=np.uint32))
    c = jnp.asarray(rng.integers(0, 2**32, size=(rows, inner), dtype=np.uint32))

    def stream(x, c):
        return lax.population_count(c[:, :, None] ^ x[:, None, :]).astype(jnp.int32).sum(1)

    cands = {"xla_default_256bit": (jax.jit(stream), (x, c)), "prefer_512bit": (jit_cpu(stream), (x, c))}
    times = interleaved(cands, reps=max(reps, 10))
    ops = rows * cols * inner
    rec = {n: round(ops / float(np.min(wall)) / 1e9, 2) for n, (wall, _) in times.items()}
    # Per CPU-second: what the cores do while this process has them.
    rec_cpu = {n: round(ops / float(np.min(cpu)) / 1e9, 2) for n, (_, cpu) in times.items()}
    emit(
        kind="xor_popcount_limit",
        measured_gwordops_per_s=rec,
        measured_gwordops_per_cpu_s=rec_cpu,
        binary_gmacs_per_s=round(32 * max(rec.values()), 1),
        binary_gmacs_per_cpu_s=round(32 * max(rec_cpu.values()), 1),
        cpu=cpu_model(),
        note="best of the streaming loop (min time); one word-op = xor + popcount + add of 32 bits",
    )
    return {"gwordops": max(rec.values()), "gwordops_per_cpu_s": max(rec_cpu.values())}


def add_limit(res: dict, baseline: str, word_ops: int, limit: dict) -> dict:
    """Time of ``word_ops`` at the measured limit, and each candidate's fraction of it."""
    t_ms = word_ops / (limit["gwordops"] * 1e9) * 1e3
    t_cpu_ms = word_ops / (limit["gwordops_per_cpu_s"] * 1e9) * 1e3
    for name, r in res.items():
        if name != baseline:
            r["fraction_of_limit"] = round(t_ms / r["median_ms"], 2)
            r["cpu_fraction_of_limit"] = round(t_cpu_ms / r["cpu_median_ms"], 2)
    return {
        "limit_ms": round(t_ms, 3),
        "limit_cpu_ms": round(t_cpu_ms, 3),
        "limit_speedup_vs_float": round(res[baseline]["median_ms"] / t_ms, 1),
        "limit_cpu_speedup_vs_float": round(res[baseline]["cpu_median_ms"] / t_cpu_ms, 1),
    }


# ----------------------------------------------------------------------------- dense


def bench_dense(m: int, k: int, n: int, reps: int, limit: dict, sweep: bool) -> dict:
    rng = np.random.default_rng(1)
    a, w = pm1(rng, (m, k)), pm1(rng, (k, n))
    ap, wp = pack_bits(a), pack_bits(w, axis=0)
    ref = np.asarray(jnp.dot(a, w, precision="highest")).astype(np.int64)

    cands = {"float32_dot": (jax.jit(jnp.dot), (a, w))}
    for meth in METHODS:
        if meth == "xor_popcount_broadcast" and m * (k // 32) * n * 4 > MAX_BROADCAST_BYTES:
            continue
        cands[meth] = (jit_cpu(lambda a, w, meth=meth: packed_dense(a, w, k, method=meth)), (ap, wp))
    if sweep:
        for g in SWEEP_GROUP_WORDS:
            if g < k // 32:
                cands[f"xor_popcount_group{g}"] = (
                    jit_cpu(lambda a, w, g=g: packed_dense(a, w, k, group_words=g)),
                    (ap, wp),
                )
    for name, (fn, args) in cands.items():
        if name != "float32_dot" and not np.array_equal(np.asarray(fn(*args)), ref):
            raise AssertionError(f"{name} differs from the float dot of ±1 values")
    times = interleaved(cands, reps)
    res = summarize(times, "float32_dot")
    emit(
        kind="dense",
        shape={"M": m, "K": k, "N": n},
        results=res,
        **add_limit(res, "float32_dot", m * (k // 32) * n, limit),
        weight_bytes={"float32": 4 * k * n, "packed": packed_size_bytes((k, n), axis=0)},
        weight_size_ratio=round(4 * k * n / packed_size_bytes((k, n), axis=0), 2),
        float32_gmacs_per_s=round(m * k * n / (res["float32_dot"]["median_ms"] * 1e6), 1),
        float32_gmacs_per_cpu_s=round(m * k * n / (res["float32_dot"]["cpu_median_ms"] * 1e6), 1),
    )
    return res


# ------------------------------------------------------------------------------ conv


def bench_conv(batch: int, hw: int, cin: int, cout: int, reps: int, limit: dict, sweep: bool) -> dict:
    rng = np.random.default_rng(2)
    x, w = pm1(rng, (batch, hw, hw, cin)), pm1(rng, (3, 3, cin, cout))
    xp, wp = pack_bits(x), pack_bits(w, axis=2)

    def fconv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # The packed conv pads with +1 pixels; the reference pads the float input the same way.
    xpad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
    ref = np.asarray(
        lax.conv_general_dilated(xpad, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )

    cands = {"float32_conv": (jax.jit(fconv), (x, w))}
    m, kw = batch * hw * hw, 9 * cin // 32
    for meth in METHODS:
        if meth == "xor_popcount_broadcast" and m * kw * cout * 4 > MAX_BROADCAST_BYTES:
            continue
        cands[meth] = (
            jit_cpu(lambda x, w, meth=meth: packed_conv(x, w, cin, 1, "SAME", 1.0, method=meth)),
            (xp, wp),
        )
    # What a packed network runs per layer: conv, then BatchNorm + sign as a threshold
    # compare that packs the next layer's bits (the int32 accumulators stay in registers).
    thr = jnp.asarray(rng.integers(-8, 9, size=cout), jnp.int32)
    flip = jnp.asarray(rng.random(cout) < 0.25)
    cands["xor_popcount_to_bits"] = (
        jit_cpu(lambda x, w, t, f: threshold_to_bits(packed_conv(x, w, cin, 1, "SAME", 1.0), t, f)),
        (xp, wp, thr, flip),
    )
    if sweep:
        for g in SWEEP_GROUP_WORDS + (kw,):
            if g <= kw:
                cands[f"xor_popcount_group{g}"] = (
                    jit_cpu(lambda x, w, g=g: packed_conv(x, w, cin, 1, "SAME", 1.0, group_words=g)),
                    (xp, wp),
                )
        # The kernel alone on precomputed patches, to separate im2col from the reduction.
        patches = geometry.im2col(jnp.pad(xp, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (1, 1), (hw, hw))
        cands["xor_popcount_patches_given"] = (
            jit_cpu(lambda p, w: packed_dense(p, w, 32 * kw)),
            (patches, wp.reshape(-1, cout)),
        )
    for name, (fn, args) in cands.items():
        if name.endswith(("patches_given", "to_bits")):
            continue
        if name != "float32_conv" and not np.array_equal(np.asarray(fn(*args)), ref):
            raise AssertionError(f"{name} differs from the float conv of ±1 values padded with +1")
    times = interleaved(cands, reps)
    res = summarize(times, "float32_conv")
    wshape = (3, 3, cin, cout)
    emit(
        kind="conv3x3_same",
        shape={"batch": batch, "H": hw, "W": hw, "C_in": cin, "C_out": cout},
        results=res,
        **add_limit(res, "float32_conv", m * kw * cout, limit),
        weight_bytes={"float32": 4 * int(np.prod(wshape)), "packed": packed_size_bytes(wshape, axis=2)},
        weight_size_ratio=round(4 * int(np.prod(wshape)) / packed_size_bytes(wshape, axis=2), 2),
    )
    return res


def bench_pack(batch: int, reps: int) -> None:
    """Cost of packing a float activation (the network input side) vs a float conv layer."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 128), dtype=np.float32))
    times = interleaved({"pack_bits": (jit_cpu(pack_bits), (x,))}, reps)
    median_ms = round(float(np.median(times["pack_bits"][0])) * 1e3, 3)
    emit(kind="pack_bits", shape=list(x.shape), median_ms=median_ms)


# ------------------------------------------------------------------------- whole model


def fashion_images(n: int, shape) -> np.ndarray:
    """``n`` Fashion-MNIST test images in [−0.5, 0.5], zero-padded to ``shape``, tiled to C."""
    import binax.data

    images, _ = binax.data.load_arrays("fashion_mnist", "test")
    im = np.resize(images, (n, 28, 28, 1)).astype(np.float32) / 255.0 - 0.5
    h, w, c = shape
    top, left = (h - 28) // 2, (w - 28) // 2
    im = np.pad(im, ((0, 0), (top, h - 28 - top), (left, w - 28 - left), (0, 0)))
    return np.tile(im, (1, 1, 1, c))


def trained_like_variables(model, x: np.ndarray, seed: int = 0) -> dict:
    """Random weights, BatchNorm statistics of ``x`` in eval mode (one pass per BN).

    No jitted ``model.init``: XLA:CPU compiles the initializers' RNG very slowly.
    """
    import flax.linen as nn

    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def param(path, s):
        name = path[-1].key
        if name == "latent_kernel":
            return rng.standard_normal(s.shape)
        if name == "kernel":
            return rng.standard_normal(s.shape) / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))
        if name == "scale":
            return rng.uniform(0.5, 1.5, s.shape) * np.where(rng.random(s.shape) < 0.25, -1.0, 1.0)
        return 0.2 * rng.standard_normal(s.shape)

    params = jax.tree_util.tree_map_with_path(lambda p, s: param(p, s).astype(np.float32), abstract["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda p, s: np.full(s.shape, float(p[-1].key == "var"), np.float32), abstract["batch_stats"]
    )

    @jax.jit
    def observe(variables, x):
        seen = {}

        def icpt(next_fun, args, kwargs, ctx):
            if isinstance(ctx.module, nn.BatchNorm):
                y = args[0]
                axes = tuple(range(y.ndim - 1))
                seen[tuple(ctx.module.path)] = (jnp.mean(y, axes), jnp.var(y, axes))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(icpt):
            model.apply(variables, x, train=False, progress=1.0)
        return seen

    for _ in range(len(stats) + 1):
        for path, (mean, var) in observe({"params": params, "batch_stats": stats}, x).items():
            node = stats
            for k in path:
                node = node[k]
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var) + 1e-3
    for node in stats.values():  # thresholds away from the batch medians
        std = np.sqrt(node["var"])
        node["mean"] = (node["mean"] + 0.25 * std * rng.standard_normal(std.shape)).astype(np.float32)
        node["var"] = (node["var"] * rng.uniform(0.5, 2.0, std.shape)).astype(np.float32)
    return {"params": params, "batch_stats": stats}


def bench_model(name: str, batch: int, reps: int, limit: dict) -> dict:
    """Whole-model float32 XLA vs packed inference, and the file sizes."""
    import tempfile

    import binax
    import binax.export as bx
    import binax.ops.binary as ops_binary

    model = binax.models.create(name)
    shape = (32, 32, 3)
    calib = fashion_images(32, shape)
    variables = trained_like_variables(model, calib)
    x = jnp.asarray(fashion_images(batch, shape))

    def eval_fn():  # a new function per jit: JAX reuses a function's trace across jits
        return lambda v, x: model.apply(v, x, train=False, progress=1.0)

    # The float32 baseline: binax.ops' convolutions as plain XLA ones (its CPU default
    # is the XNOR-popcount forward). The patch only matters while tracing.
    default_impl = ops_binary.default_impl
    ops_binary.default_impl = lambda backend=None: "xla"
    try:
        float_fn = jax.jit(eval_fn()).lower(variables, x)
    finally:
        ops_binary.default_impl = default_impl
    auto_fn = jax.jit(eval_fn()).lower(variables, x)
    if "popcnt" in float_fn.as_text() or "popcnt" not in auto_fn.as_text():
        raise AssertionError("the float32 baseline must not use XNOR-popcount (and auto should on CPU)")
    float_fn, auto_fn = float_fn.compile(), auto_fn.compile()

    t0 = time.process_time()
    packed = bx.export(model, variables, preprocessing=None, input_shape=shape)
    export_cpu_s = time.process_time() - t0
    ref = np.asarray(float_fn(variables, x))
    got = np.asarray(packed.forward(x))
    if not np.array_equal(ref.argmax(-1), got.argmax(-1)) or not np.allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()):
        raise AssertionError(f"packed {name} differs from its eval graph: max |diff| {np.abs(got - ref).max()}")

    cands = {
        "float32_xla": (float_fn, (variables, x)),
        "train_graph_auto": (auto_fn, (variables, x)),
        "packed": (packed._forward, (packed._device_arrays, x)),
    }
    times = interleaved(cands, reps)
    res = summarize(times, "float32_xla")
    # What bounds the packed time: its XOR-popcount word-ops at the machine's measured rate.
    word_ops = 0
    for path, layer in packed.layers.items():
        bits = packed.arrays()["layers/" + "/".join(path) + "/bits"]
        out_shape = packed._calls[path].out_shape
        word_ops += batch * int(np.prod(out_shape[1:-1])) * int(np.prod(bits.shape))
    packed_limit = add_limit({"float32_xla": res["float32_xla"], "packed": dict(res["packed"])}, "float32_xla", word_ops, limit)

    n_values = sum(int(np.size(a)) for a in jax.tree.leaves(variables))
    float32_bytes = 4 * n_values
    with tempfile.TemporaryDirectory() as tmp:
        file_bytes = packed.save(os.path.join(tmp, f"{name}.npz"))
        portable_bytes = packed.save_portable(os.path.join(tmp, f"{name}.jaxexport"))
    summary = binax.summary(model, shape)
    record = dict(
        kind="model",
        model=name,
        batch=batch,
        input_shape=list(shape),
        results=res,
        speedup_packed_vs_float32=res["packed"]["speedup_vs_float"],
        cpu_speedup_packed_vs_float32=res["packed"]["cpu_speedup_vs_float"],
        predictions_equal=True,
        max_abs_logit_diff=float(np.abs(got - ref).max()),
        sizes={
            "float32_bytes": float32_bytes,
            "packed_file_bytes": file_bytes,
            "packed_array_bytes": packed.nbytes,
            "portable_artifact_bytes": portable_bytes,
            "summary_packed_bytes": round(summary.totals.memory_bytes),
            "file_ratio": round(float32_bytes / file_bytes, 2),
            "array_ratio": round(float32_bytes / packed.nbytes, 2),
            "portable_ratio": round(float32_bytes / portable_bytes, 2),
        },
        popcount_word_ops=word_ops,
        popcount_limit_ms=packed_limit["limit_ms"],
        popcount_limit_cpu_ms=packed_limit["limit_cpu_ms"],
        packed_cpu_fraction_of_popcount_limit=round(packed_limit["limit_cpu_ms"] / res["packed"]["cpu_median_ms"], 2),
        packed_layers=sum(1 for layer in packed.layers.values() if layer.packed),
        fused_blocks=sorted(packed.meta.get("fused", {})),
        export_cpu_s=round(export_cpu_s, 2),
    )
    emit(**record)
    return record


def bench_lce(name: str, batches, reps: int) -> dict:
    """Float32 XLA, binax packed and LCE's interpreter on the same exported ``name``."""
    import tempfile

    import binax
    import binax.export as bx
    import binax.ops.binary as ops_binary
    from binax.export import lce

    model = binax.models.create(name)
    shape = (32, 32, 3)
    variables = trained_like_variables(model, fashion_images(32, shape))
    packed = bx.export(model, variables, preprocessing=None, input_shape=shape)
    threads = os.cpu_count()
    out = {}
    default_impl = ops_binary.default_impl
    for b in batches:
        x = jnp.asarray(fashion_images(b, shape))
        ops_binary.default_impl = lambda backend=None: "xla"
        try:
            float_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, progress=1.0)).lower(variables, x).compile()
        finally:
            ops_binary.default_impl = default_impl
        times = interleaved({"float32_xla": (float_fn, (variables, x)), "packed": (packed._forward, (packed._device_arrays, x))}, reps)
        out[b] = summarize(times, "float32_xla")
    with tempfile.TemporaryDirectory() as tmp:
        for b in batches:
            x = fashion_images(b, shape)
            r = lce.run_lce({name: packed}, tmp, batch_size=b, inputs={name: x}, timing={"repeats": reps, "warmup": 2}, threads=threads)[name]
            ref = np.asarray(packed.forward(x))
            wall, cpu = np.asarray(r["seconds"]), np.asarray(r["cpu_seconds"])
            out[b]["lce_interpreter"] = {
                "median_ms": round(float(np.median(wall)) * 1e3, 3),
                "min_ms": round(float(np.min(wall)) * 1e3, 3),
                "cpu_median_ms": round(float(np.median(cpu)) * 1e3, 3),
                "predictions_equal_packed": bool(np.array_equal(r["lce"].argmax(-1), ref.argmax(-1))),
                "max_abs_logit_diff": float(np.abs(r["lce"] - ref).max()),
                "tflite_bytes": r["tflite_bytes"],
            }
    record = dict(kind="lce", model=name, input_shape=list(shape), threads=threads, results={str(b): v for b, v in out.items()})
    emit(**record)
    return record


def table(limit: dict, dense: dict, model: dict | None) -> dict:
    """The figures of docs/performance.md's packed-inference table, from this run."""
    out = {
        "xor_popcount_limit_gwordops_per_s": limit["gwordops"],
        "xor_popcount_limit_gwordops_per_cpu_s": limit["gwordops_per_cpu_s"],
        "binary_gmacs_per_cpu_s_at_limit": round(32 * limit["gwordops_per_cpu_s"], 1),
    }
    for (m, k, n), res in dense.items():
        key = f"dense_{m}x{k}x{n}"
        out[key] = {
            "float32_cpu_ms": res["float32_dot"]["cpu_median_ms"],
            "packed_cpu_ms": res["xor_popcount"]["cpu_median_ms"],
            "speedup_wall": res["xor_popcount"]["speedup_vs_float"],
            "speedup_cpu": res["xor_popcount"]["cpu_speedup_vs_float"],
            "cpu_fraction_of_limit": res["xor_popcount"].get("cpu_fraction_of_limit"),
            "float32_gmacs_per_cpu_s": round(m * k * n / (res["float32_dot"]["cpu_median_ms"] * 1e6), 1),
        }
    if model:
        r = model["results"]
        out[f"model_{model['model']}_batch{model['batch']}"] = {
            "float32_cpu_ms": r["float32_xla"]["cpu_median_ms"],
            "train_graph_auto_cpu_ms": r["train_graph_auto"]["cpu_median_ms"],
            "packed_cpu_ms": r["packed"]["cpu_median_ms"],
            "speedup_wall": r["packed"]["speedup_vs_float"],
            "speedup_cpu": r["packed"]["cpu_speedup_vs_float"],
            "cpu_fraction_of_limit": model["packed_cpu_fraction_of_popcount_limit"],
            **model["sizes"],
        }
    emit(kind="table", **out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="batch of the VGG-small convolutions and the whole model")
    p.add_argument("--reps", type=int, default=7, help="timed rounds after one warm-up round")
    p.add_argument("--quick", action="store_true", help="smaller shapes for a smoke run")
    p.add_argument("--sweep", action="store_true", help="also time kernel tuning knobs")
    p.add_argument("--model", default="vgg_small", help="whole registry model to time ('' for none)")
    p.add_argument("--model-only", action="store_true", help="only the limit and the whole model")
    p.add_argument("--lce", action="store_true", help="also race LCE's x86 interpreter on --model (batch 1, 16)")
    p.add_argument("--lce-only", action="store_true", help="only the LCE race (with its machine record)")
    args = p.parse_args()
    emit(
        kind="machine",
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        processor=cpu_model(),
        jax=jax.__version__,
        load_average=list(os.getloadavg()),
        compiler_options=CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None,
    )
    if args.lce_only:
        bench_lce(args.model or "vgg_small", (1, 16), args.reps)
        emit(kind="done", load_average=list(os.getloadavg()))
        return
    limit = measure_limit(args.reps)
    dense = {}
    if not args.model_only:
        dense_shapes = [(128, 4096, 4096), (128, 1024, 1024), (16, 4096, 4096)]
        if args.quick:
            dense_shapes = [(128, 1024, 1024)]
        for m, k, n in dense_shapes:
            dense[(m, k, n)] = bench_dense(m, k, n, args.reps, limit, args.sweep)
        convs = VGG_SMALL_CONVS[::2] if args.quick else VGG_SMALL_CONVS
        for hw, cin, cout in convs:
            bench_conv(args.batch, hw, cin, cout, args.reps, limit, args.sweep)
        bench_pack(args.batch, args.reps)
    model = bench_model(args.model, args.batch, args.reps, limit) if args.model else None
    table(limit, dense, model)
    if args.lce and args.model:
        bench_lce(args.model, (1, 16), args.reps)
    emit(kind="done", load_average=list(os.getloadavg()))


if __name__ == "__main__":
    main()
