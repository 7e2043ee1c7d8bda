"""Training-step speed of binax vs Larq and PyTorch, interleaved in one run (issue 7).

The same networks in every framework, batch 128 (ResNet-18: 8), synthetic data, Adam(1e-3) on softmax
cross-entropy, ``ste_sign`` on binarized inputs and kernels:

* ``vgg_small``: binax ``binax.models.create('vgg_small', ...)`` with ``ste_sign``
  quantizers and no activation (BN feeds the next layer's sign): float conv 3→128, binary
  3×3 convs 128-256-256-512-512 (padded with +1), 2×2 max-pool after the 2nd, 4th, 6th
  conv, batch norm after each conv (after the pool where there is one), float dense 8192→10.
* ``bnn_mlp``: ``create('bnn_mlp')``: float dense 784→2048, binary dense 2048→2048 ×2, BN
  after each, float dense 2048→10.
* ``resnet18``: ``create('resnet18')`` (Bi-Real Net's ResNet-18, ImageNet-shaped) with
  ``ste_sign`` quantizers, at 224×224×3 and 1000 classes: float 7×7/2 conv 64 → BN → 3×3/2
  max-pool; 16 residual units ``sign → binary 3×3 conv (padded with +1) → BN → + shortcut``
  in stages 64/128/256/512 (2 blocks of 2 units each); downsampling shortcuts 2×2/2
  average pool → float 1×1 conv → BN; global average pool, float dense 512→1000. Its
  batch is ``--resnet-batch`` (default 8: about a second per step on 2 cores).

Variants, each in its own worker process (one per framework setting):

* ``binax``: binax binary, default implementation (``binax.ops`` chooses per backend);
* ``binax_xla``: binax binary with the plain XLA formulation (``impl='xla'``) — what a
  plain JAX/Flax model with an STE costs;
* ``binax_float``: binax with no quantizers (the cost of binarizing: binax / binax_float);
* ``larq``: Larq on tf-keras 2 (``train_on_batch``); ``larq_xla``: the same with
  ``jit_compile=True`` (TF + XLA);
* ``torch``, ``torch_cl`` (channels_last), ``torch_compile`` (opt-in, slow to compile).

Timing: every worker warms up, then rounds go round-robin over the workers (the order
rotated each round); each worker times one chunk of consecutive steps (about
``--chunk-seconds`` long) while the others wait idle. Reported per network and variant:
median images/s over all timed steps with the min–max over steps, CPU-seconds per step,
and the ratio binax / variant as the median of per-round ratios (rounds share the
machine's load, so ratios are steadier than absolute rates on a busy machine).

The peers' environments come from ``benchmarks/peers/setup.sh`` (run first, once).
All workers run with the same environment; ``--malloc retain`` (default) sets glibc's
malloc to keep freed memory (one arena, no mmap, no trimming) for every worker, because
XLA:CPU allocates each step's buffers with malloc and large blocks otherwise come from
fresh mmaps whose page faults cost more than the arithmetic (see docs/performance.md).

Usage::

    bash benchmarks/peers/setup.sh            # once: .venv-larq, .venv-torch
    .venv/bin/python -m benchmarks.vs_peers   # ~10-15 min on 2 cores; --quick for a smoke run

Output: a Markdown table on stdout, and ``--json PATH`` for the raw records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")

# glibc malloc: one arena, never mmap, never trim, so freed blocks are reused and the
# same pages serve every step (glibc reads this at process start). The one setting
# `python -m experiments.run` recommends and `bash dev.sh run` sets.
from experiments.run import RETAIN_MALLOC  # noqa: E402

MODELS = ("vgg_small", "bnn_mlp", "resnet18")
# (input shape, classes) per network; the peers' workers build the same.
SHAPES = {"vgg_small": ((32, 32, 3), 10), "bnn_mlp": ((28, 28, 1), 10), "resnet18": ((224, 224, 3), 1000)}
VARIANTS = ("binax", "binax_xla", "binax_float", "larq", "larq_xla", "torch", "torch_cl", "torch_compile")
DEFAULT_VARIANTS = ("binax", "binax_xla", "binax_float", "larq", "larq_xla", "torch", "torch_cl")
# torch_cl only differs from torch for convolutions.
ONLY_MODELS = {"torch_cl": ("vgg_small", "resnet18")}



# ---------------------------------------------------------------------- binax worker


def binax_step(name: str, batch: int, variant: str):
    """One jitted binax training step on a fixed batch (the same recipe as the peers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import binax.models
    import binax.ops

    if variant == "binax_xla":
        # The plain formulation: every binary product as lax.conv / lax.dot, autodiffed.
        binax.ops.binary.default_impl = lambda backend=None: "xla"
    q = None if variant == "binax_float" else "ste_sign"
    overrides = dict(input_quantizer=q, input_quantizer_kwargs={}, kernel_quantizer=q, kernel_quantizer_kwargs={})
    if name in ("vgg_small", "resnet18"):
        overrides["activation"] = "none"
    model = binax.models.create(name, **overrides)
    shape, classes = SHAPES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *shape), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, classes, batch))
    variables = model.init(jax.random.key(0), x[:1], train=False)
    tx = optax.adam(1e-3)

    def loss_fn(params, batch_stats):
        logits, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

    def train_step(state):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    train_step = jax.jit(train_step, donate_argnums=0)
    state = [(variables["params"], variables["batch_stats"], tx.init(variables["params"]))]

    def step():
        state[0], loss = train_step(state[0])
        loss.block_until_ready()

    step.hlo = lambda: train_step.lower(state[0]).compile().as_text()  # for profiling
    return step


def run_binax_worker(args) -> None:
    import jax

    from benchmarks.peers._worker import serve

    steps = {m: binax_step(m, args.batch, args.worker) for m in args.models.split(",")}
    serve(steps, {"framework": "binax", "jax": jax.__version__, "backend": jax.default_backend()})


# ----------------------------------------------------------------------- coordinator


def model_batch(model: str, args) -> int:
    """The batch of one network: ``--resnet-batch`` for ResNet-18 at 224, else ``--batch``."""
    return args.resnet_batch if model == "resnet18" else args.batch


class Worker:
    def __init__(self, variant: str, models: list[str], args):
        self.variant = variant
        self.models = models
        py = {
            "binax": sys.executable,
            "larq": os.path.join(PEERS, ".venv-larq", "bin", "python"),
            "torch": os.path.join(PEERS, ".venv-torch", "bin", "python"),
        }[variant.split("_")[0]]
        if not os.path.exists(py):
            raise SystemExit(f"{py} is missing: run `bash benchmarks/peers/setup.sh` first.")
        ms = ",".join(models)
        batch = model_batch(models[0], args)
        if variant.startswith("binax"):
            cmd = [py, "-m", "benchmarks.vs_peers", "--worker", variant, "--models", ms, "--batch", str(batch)]
        elif variant.startswith("larq"):
            cmd = [py, os.path.join(PEERS, "larq_worker.py"), "--models", ms, "--batch", str(batch)]
            cmd += ["--xla"] if variant == "larq_xla" else []
        else:
            cmd = [py, os.path.join(PEERS, "torch_worker.py"), "--models", ms, "--batch", str(batch)]
            cmd += {"torch": [], "torch_cl": ["--channels-last"], "torch_compile": ["--compile"]}[variant]
        env = dict(os.environ)
        if args.malloc == "retain":
            env["GLIBC_TUNABLES"] = RETAIN_MALLOC
        self.log = open(os.path.join(args.log_dir, f"{variant}.log"), "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        self.info = None

    def ready(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.variant} died while starting; see its log {self.log.name}.")
        self.info = json.loads(line)["info"]
        return self.info

    def run(self, model: str, steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": "run", "model": model, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.variant} died running {model}; see its log {self.log.name}.")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_vpopcntdq", "avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "load_avg_start": os.getloadavg()}


def benchmark_model(model: str, variants: list[str], args) -> dict:
    """Warm-up, then interleaved rounds, for one network; the workers live only for it."""
    workers = []
    try:
        for v in variants:
            workers.append(Worker(v, [model], args))
        for w in workers:
            w.ready()
            print(f"# {model}: {w.variant} ready {w.info}", file=sys.stderr, flush=True)
        chunk = {}
        for w in workers:
            warm = w.run(model, args.warmup)["wall"]
            per_step = min(warm[1:] or warm)
            chunk[w.variant] = max(1, min(args.max_chunk, round(args.chunk_seconds / per_step)))
            print(f"# {model}: {w.variant} warm-up {[round(t, 3) for t in warm]} s -> {chunk[w.variant]} step(s)/chunk", file=sys.stderr, flush=True)
        records = {w.variant: {"wall": [], "cpu": [], "rounds": []} for w in workers}
        for r in range(args.rounds):
            order = workers[r % len(workers):] + workers[: r % len(workers)]
            for w in order:
                res = w.run(model, chunk[w.variant])
                rec = records[w.variant]
                rec["wall"] += res["wall"]
                rec["cpu"] += res["cpu"]
                rec["rounds"].append(statistics.median(res["wall"]))
            print(f"# {model}: round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        return {"records": records, "info": {w.variant: w.info for w in workers}, "chunk": chunk}
    finally:
        for w in workers:
            w.close()


def summarize(model: str, result: dict, batch: int) -> list[dict]:
    recs = result["records"]
    base = recs.get("binax")
    rows = []
    for v, rec in recs.items():
        ips = [batch / t for t in rec["wall"]]
        row = {
            "model": model,
            "variant": v,
            "batch": batch,
            "steps": len(rec["wall"]),
            "img_s_median": batch / statistics.median(rec["wall"]),
            "img_s_min": min(ips),
            "img_s_max": max(ips),
            "cpu_s_per_step": statistics.median(rec["cpu"]),
        }
        if base is not None:
            # Per-round ratio of step times: binax images/s over this variant's.
            row["binax_ratio"] = statistics.median(t / b for t, b in zip(rec["rounds"], base["rounds"]))
            row["binax_cpu_ratio"] = statistics.median(rec["cpu"]) / statistics.median(base["cpu"])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| network | variant | batch | images/s median (min–max) | CPU s/step | binax ÷ variant (wall) | (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['binax_ratio']:.2f}×" if "binax_ratio" in r else "–"
        cpu_ratio = f"{r['binax_cpu_ratio']:.2f}×" if "binax_cpu_ratio" in r else "–"
        out.append(
            f"| {r['model']} | {r['variant']} | {r['batch']} | {r['img_s_median']:.1f} ({r['img_s_min']:.1f}–{r['img_s_max']:.1f}) "
            f"| {r['cpu_s_per_step']:.3f} | {ratio} | {cpu_ratio} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--resnet-batch", type=int, default=8, help="batch of resnet18 (224x224)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker (the first compiles)")
    p.add_argument("--chunk-seconds", type=float, default=2.0, help="timed seconds per worker per round")
    p.add_argument("--max-chunk", type=int, default=50)
    p.add_argument("--malloc", choices=("retain", "default"), default="retain")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 16, 2 rounds, short chunks")
    p.add_argument("--json", help="write the raw records and the summary here")
    p.add_argument("--log-dir", default=None, help="workers' stderr logs (default: a temporary directory)")
    p.add_argument("--worker", choices=("binax", "binax_xla", "binax_float"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        run_binax_worker(args)
        return
    if args.quick:
        args.batch, args.rounds, args.chunk_seconds, args.warmup = 16, 2, 0.5, 2
        args.resnet_batch = min(args.resnet_batch, 2)
    if args.log_dir is None:
        import tempfile

        args.log_dir = tempfile.mkdtemp(prefix="vs_peers_")
    os.makedirs(args.log_dir, exist_ok=True)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; valid: {', '.join(VARIANTS)}")
    t0 = time.time()
    info = machine_info()
    print(f"# machine {info}; worker logs in {args.log_dir}", file=sys.stderr, flush=True)
    rows, raw = [], {}
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
        vs = [v for v in variants if model in ONLY_MODELS.get(v, MODELS)]
        raw[model] = benchmark_model(model, vs, args)
        rows += summarize(model, raw[model], model_batch(model, args))
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = round(time.time() - t0, 1)
    table = markdown(rows)
    print(table)
    print(f"\nbatch {args.batch} (resnet18: {args.resnet_batch}), {args.rounds} rounds, malloc={args.malloc}, {info['wall_s']} s; machine: {info}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": info, "rows": rows, "raw": raw}, f, indent=1)


if __name__ == "__main__":
    main()
