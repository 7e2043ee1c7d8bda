"""Memory on paper: bytes per image of the ResNet-18 train step, and the largest batch per chip.

Compiles (on this machine, no accelerator needed) the jitted train step of the IR-Net
ResNet-18 ImageNet recipe at 224x224 at two batch sizes, reads XLA's buffer assignment
(``compiled.memory_analysis()``: arguments, outputs, temporaries), and fits
``bytes = fixed + per_image * batch`` through the two points. Prints JSON lines::

    python -m benchmarks.memory                       # batches 8 and 16, float32 and bfloat16
    python -m benchmarks.memory --batches 16,32 --impl auto

``--impl xla`` (default) compiles the binary layers in the formulation GPUs and TPUs run
(``binax.ops`` picks ``"xla"`` there: float activations kept for the backward); ``auto``
is this host's choice (XNOR-popcount on CPU, which keeps the ±1 activations as bits).
The CPU compiler's fusion and buffer reuse are not the GPU's or TPU's, so the largest
batches are ESTIMATES: ``usable_fraction`` of each chip's memory (JAX preallocates 75 % of
a GPU by default, ``XLA_PYTHON_CLIENT_MEM_FRACTION``; a TPU's HBM is all usable), minus
the fixed part, divided by the bytes per image.
"""

from __future__ import annotations

import argparse
import json


import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax.data
import binax.ops.binary
from binax import train
from configs import recipe

# (bytes of memory, usable fraction) per chip.
CHIPS = {
    "H200 (141 GB)": (141e9, 0.75),
    "TPU v4 (32 GiB)": (32 * 2**30, 1.0),
}


def step_bytes(dtype: str, batch: int) -> dict:
    """XLA's memory analysis of the compiled train step at ``batch``."""
    config = recipe.get_config("method=irnet,dataset=imagenet2012")
    config.compute_dtype = dtype
    config.batch_size = batch
    ds = binax.data.create({"name": "synthetic"}, seed=0)
    trainer = train.build_trainer(config, ds)
    mesh = train.make_mesh()
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.eval_shape(trainer.init)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch, *ds.image_shape), "float32", sharding=data),
        "label": jax.ShapeDtypeStruct((batch,), "int32", sharding=data),
    }
    step = jax.jit(trainer.train_fn, in_shardings=(replicated, data), out_shardings=replicated, donate_argnums=0)
    m = step.lower(state, batch_spec).compile().memory_analysis()
    # Donated state: outputs alias the arguments, so the peak is arguments + temporaries
    # + the outputs that do not alias (the metrics).
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "total": total,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="8,16", help="two batch sizes")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impl", choices=("xla", "auto"), default="xla")
    args = p.parse_args(argv)
    b1, b2 = (int(b) for b in args.batches.split(","))
    if args.impl == "xla":
        binax.ops.binary.default_impl = lambda backend=None: "xla"
    for dtype in args.dtypes.split(","):
        m1, m2 = step_bytes(dtype, b1), step_bytes(dtype, b2)
        per_image = (m2["total"] - m1["total"]) / (b2 - b1)
        fixed = m1["total"] - per_image * b1
        record = {
            "benchmark": "memory",
            "model": "resnet18 (IR-Net ImageNet recipe, 224x224)",
            "compute_dtype": dtype,
            "impl": args.impl,
            "compiled_on": jax.default_backend(),
            "batches": [b1, b2],
            "bytes": [m1, m2],
            "bytes_per_image": round(per_image),
            "fixed_bytes": round(fixed),
            "largest_batch_estimate": {
                chip: int((size * usable - fixed) // per_image) for chip, (size, usable) in CHIPS.items()
            },
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
