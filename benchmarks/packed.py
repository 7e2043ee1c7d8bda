"""Packed XNOR-popcount kernels vs float32 XLA on this machine (issue 6).

One run times, interleaved and repeated (median after warm-up), on the same machine:

* the XOR+popcount limit of the CPU as XLA compiles it: a compute-bound loop of
  ``acc += popcount(x ^ c)`` (32 words of ``c`` per loaded word of ``x``, data in L2);
  its word-ops/s turn each packed kernel's work (``M·K/32·N`` word-ops) into a lower
  bound on its time. Printed next to the paper estimate cores × lanes × clock / cycles;
* dense ``M×K×N`` (including 128×4096×4096): float32 ``jnp.dot`` vs ``packed_dense``
  for each formulation in ``binax.export.METHODS``;
* the VGG-small 3×3 SAME convolutions at batch ``--batch``: float32
  ``lax.conv_general_dilated`` vs ``packed_conv``, alone and followed by
  ``threshold_to_bits`` (BatchNorm + sign into the next layer's bits, what a packed
  network runs per layer; the float side is timed without its BatchNorm, which
  flatters float slightly);
* the weight file-size ratio float32 / packed per shape.

Every line of output is one JSON object. Packed timings start from packed activations
(what a packed network passes between binary layers); ``pack_bits`` of a float input is
timed separately. Ratios are medians of per-round ratios (float time / packed time in the
same round), which the load of other processes distorts less than ratios of medians;
``cpu_*`` fields use this process's CPU time (all threads), which hardly grows when
other processes share the cores, and are the steadier figure on a busy machine.

Usage: ``python benchmarks/packed.py [--batch 128] [--reps 7] [--quick] [--sweep]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __package__ in (None, ""):  # run as a script from a checkout without installing binax
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from binax.export import (  # noqa: E402
    CPU_COMPILER_OPTIONS,
    METHODS,
    pack_bits,
    packed_conv,
    packed_dense,
    packed_size_bytes,
    threshold_to_bits,
)
from binax.export import kernels as _kernels  # noqa: E402

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
    cores = os.cpu_count() or 1
    emit(
        kind="xor_popcount_limit",
        measured_gwordops_per_s=rec,
        measured_gwordops_per_cpu_s=rec_cpu,
        estimate=(
            f"{cores} cores x 16 uint32 lanes (AVX-512) / 1.5 cycles per word (vpxord+vpaddd on the "
            f"fused port 0, vpopcntd on port 5) x clock; at 2.3 GHz = {cores * 16 / 1.5 * 2.3:.1f} G word-ops/s"
        ),
        note="measured = best of the streaming loop (min time); the limits below use the best of each",
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


def bench_dense(m: int, k: int, n: int, reps: int, limit: dict, sweep: bool) -> None:
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
    )


# ------------------------------------------------------------------------------ conv


def bench_conv(batch: int, hw: int, cin: int, cout: int, reps: int, limit: dict, sweep: bool) -> None:
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
        patches = _kernels._im2col(jnp.pad(xp, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (1, 1), (hw, hw))
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


def bench_pack(batch: int, reps: int) -> None:
    """Cost of packing a float activation (the network input side) vs a float conv layer."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 128), dtype=np.float32))
    times = interleaved({"pack_bits": (jit_cpu(pack_bits), (x,))}, reps)
    median_ms = round(float(np.median(times["pack_bits"][0])) * 1e3, 3)
    emit(kind="pack_bits", shape=list(x.shape), median_ms=median_ms)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="batch of the VGG-small convolutions")
    p.add_argument("--reps", type=int, default=7, help="timed rounds after one warm-up round")
    p.add_argument("--quick", action="store_true", help="smaller shapes for a smoke run")
    p.add_argument("--sweep", action="store_true", help="also time kernel tuning knobs")
    args = p.parse_args()
    emit(
        kind="machine",
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(),
        processor=platform.processor() or platform.machine(),
        jax=jax.__version__,
        load_average=list(os.getloadavg()),
        compiler_options=CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None,
    )
    limit = measure_limit(args.reps)
    dense_shapes = [(128, 4096, 4096), (128, 1024, 1024), (16, 4096, 4096)]
    if args.quick:
        dense_shapes = [(128, 1024, 1024)]
    for m, k, n in dense_shapes:
        bench_dense(m, k, n, args.reps, limit, args.sweep)
    convs = VGG_SMALL_CONVS[::2] if args.quick else VGG_SMALL_CONVS
    for hw, cin, cout in convs:
        bench_conv(args.batch, hw, cin, cout, args.reps, limit, args.sweep)
    bench_pack(args.batch, args.reps)
    emit(kind="done", load_average=list(os.getloadavg()))


if __name__ == "__main__":
    main()
