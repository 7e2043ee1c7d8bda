"""Train-step throughput: images per second of the jitted, sharded binax train step.

Prints one JSON line per measurement::

    python -m benchmarks.train_step                                  # configs/default.py
    python -m benchmarks.train_step --config configs/digits_mlp.py --steps 100
    python -m benchmarks.train_step --dtypes float32,bfloat16 --with_loader

The step is the one ``binax.train.train_and_evaluate`` runs (``build_trainer``), fed one
fixed batch of the dataset's own images already on the devices, so the figure is compute
alone; ``--with_loader`` adds the loader's rate (``benchmarks/input_pipeline.py``) for the
same batch size: training runs at roughly the smaller of the two. ``cpu_s`` is this
process's CPU time (all threads), steadier than wall time when other processes share the
cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax.data
from binax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_step_images_per_second(config, *, steps: int = 50, warmup_steps: int = 2) -> dict:
    """Times ``steps`` updates of ``config``'s train step after ``warmup_steps`` (compilation
    is timed separately as ``compile_s``). Returns a record with ``images_per_s``."""
    ds = binax.data.create(config.data, seed=config.seed)
    trainer = train.build_trainer(config, ds)
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    batch = next(iter(ds.train_batches(0, config.batch_size)))
    batch = jax.device_put({k: np.asarray(v) for k, v in batch.items()}, NamedSharding(mesh, P("data")))
    state = jax.jit(trainer.init, out_shardings=replicated)()
    step = jax.jit(trainer.train_fn, out_shardings=replicated, donate_argnums=0)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup_steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "benchmark": "train_step",
        "model": config.model.name,
        "dataset": config.data.name,
        "batch_size": config.batch_size,
        "compute_dtype": config.compute_dtype,
        "devices": jax.device_count(),
        "steps": steps,
        "compile_s": compile_s,
        "step_ms": 1000 * wall / steps,
        "images_per_s": steps * config.batch_size / wall,
        "cpu_s": cpu,
        "final_loss": float(metrics["loss"]),
    }


def load_config(path: str):
    """``get_config(arg)`` of a config file named as on the command line (``x.py:arg``)."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--dtypes", default="float32", help="comma-separated compute dtypes")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--with_loader", action="store_true")
    args = parser.parse_args(argv)
    host = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "backend": jax.default_backend()}
    for dtype in args.dtypes.split(","):
        config = load_config(args.config)
        config.compute_dtype = dtype
        if args.batch_size:
            config.batch_size = args.batch_size
        print(json.dumps({**train_step_images_per_second(config, steps=args.steps), **host}), flush=True)
    if args.with_loader:
        from benchmarks.input_pipeline import loader_images_per_second

        ds = binax.data.create(config.data, seed=config.seed)
        record = loader_images_per_second(ds, config.batch_size, max_steps=args.steps)
        print(json.dumps({"benchmark": "loader", "dataset": config.data.name, **record, **host}), flush=True)


if __name__ == "__main__":
    main()
