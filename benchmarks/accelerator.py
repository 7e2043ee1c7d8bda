"""One command for a device: what binax's training and inference run at on this machine.

Prints JSON lines (one per measurement), under 5 minutes on one GPU::

    python -m benchmarks.accelerator            # batch 256, ImageNet-shaped synthetic data
    python -m benchmarks.accelerator --quick    # CPU smoke run, under a minute

Records (``"benchmark"`` key):

* ``device``: platform, device kind and count, jax version;
* ``train_step`` for ``resnet18_irnet`` (the IR-Net ResNet-18 ImageNet recipe, binary) and
  ``resnet18_float`` (the same network and optimizer without quantizers) in float32 and
  bfloat16: images/s of the jitted, sharded train step of ``binax.train.build_trainer`` on
  ``data.name='synthetic'`` batches drawn on the devices (no host pipeline), and of
  ``vgg_small`` (the IR-Net CIFAR-10 recipe) on CIFAR-shaped ones;
* ``binary_vs_float``: binary step time / float step time per dtype;
* ``packed_inference``: ``vgg_small`` exported (``binax.export``) from the state the
  VGG-small steps trained, run on the device: images/s, and the share of predictions equal
  to the eval graph's (``binax.train.evaluate`` on the same variables);
* ``host_pipeline``: images/s the host's input pipeline delivers (``--pipeline``, default
  ``imagenet2012`` when tfds has it built, else ``fashion_mnist``), nothing consuming them.

``--quick``: tiny images and batches, the quick (4x narrower) recipes with the ResNet cut
to two stages of one block, two timed steps: a check that every record is produced, not
a measurement.
The step timings exclude compilation (``compile_s``), and every timed step ends with
``block_until_ready``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax.data
from binax import train
from configs import recipe

DTYPES = ("float32", "bfloat16")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def device_record() -> dict:
    device = jax.devices()[0]
    return {
        "benchmark": "device",
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
    }


def step_config(network: str, dtype: str, *, batch: int, quick: bool, image: int):
    """The recipe config of ``network`` on synthetic data of its dataset's shape."""
    suffix = ",quick" if quick else ""
    if network == "vgg_small":
        config = recipe.get_config("method=irnet,dataset=cifar10" + suffix)
        shape, classes = (32, 32, 3), 10
    else:
        config = recipe.get_config("method=irnet,dataset=imagenet2012" + suffix)
        shape, classes = (image, image, 3), 1000
        if network == "resnet18_float":
            # The float twin: the same network and optimizer, no quantizers (hardtanh kept).
            config.model.input_quantizer = None
            config.model.kernel_quantizer = None
    if quick and network != "vgg_small":
        # Two stages of one block (a plain and a strided unit with its downsampling
        # shortcut): every kind of layer, a quarter of the units to compile.
        config.model.stage_sizes, config.model.stage_widths = (1, 1), (64, 128)
    config.data = binax.data.default_config()
    config.data.name = "synthetic"
    config.data.image_shape, config.data.num_classes = shape, classes
    config.batch_size = batch
    config.max_steps_per_epoch = None
    config.compute_dtype = dtype
    return config


def time_train_step(config, steps: int) -> tuple[dict, object]:
    """Images/s of ``config``'s jitted, sharded train step; returns (record, final state)."""
    ds = binax.data.create(config.data, seed=config.seed)
    trainer = train.build_trainer(config, ds)
    replicated = NamedSharding(train.make_mesh(), P())
    state = jax.jit(trainer.init, out_shardings=replicated)()
    batches = ds.train_batches(0, config.batch_size)
    batch = next(batches)
    t0 = time.perf_counter()
    compiled = jax.jit(trainer.train_fn, out_shardings=replicated, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    # Fresh device batches, drawn before the clock starts (the draw is not the step).
    timed = [next(batches) for _ in range(min(steps, 4))]
    jax.block_until_ready(timed)
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = compiled(state, timed[i % len(timed)])
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - t0
    return {
        "batch_size": config.batch_size,
        "image_shape": list(ds.image_shape),
        "compute_dtype": config.compute_dtype,
        "steps": steps,
        "compile_s": round(compile_s, 3),
        "step_ms": round(1000 * wall / steps, 3),
        "images_per_s": round(steps * config.batch_size / wall, 2),
        "loss": float(metrics["loss"]),
    }, state


def packed_inference(config, state, *, batch: int, steps: int) -> dict:
    """``vgg_small`` packed from ``state``: agreement with the eval graph, images/s."""
    import binax.export

    model = train.create_model(config.model)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    packed = binax.export.export(model, variables, preprocessing=None, input_shape=tuple(config.data.image_shape))
    ds = binax.data.create(config.data, seed=config.seed + 1)
    images = np.concatenate([np.asarray(b["image"]) for b in itertools.islice(ds.train_batches(0, batch), 4)])
    got = np.asarray(packed(images))
    want = train.evaluate(model, variables, train.array_batches(images, batch_size=batch), keep_logits=True).logits
    agree = float(np.mean(np.argmax(got, -1) == np.argmax(want, -1)))
    x = jax.device_put(images[:batch])
    jax.block_until_ready(packed.forward(x))  # compile
    t0 = time.perf_counter()
    for _ in range(steps):
        out = packed.forward(x)
    jax.block_until_ready(out)
    wall = time.perf_counter() - t0
    return {
        "benchmark": "packed_inference",
        "model": "vgg_small",
        "runtime": packed.runtime,
        "batch_size": batch,
        "images_checked": len(images),
        "prediction_agreement": agree,
        "predictions_equal": agree == 1.0,
        "max_abs_logit_diff": float(np.max(np.abs(got - want))),
        "images_per_s": round(steps * batch / wall, 2),
    }


def host_pipeline(name: str | None, *, batch: int, steps: int) -> dict:
    from benchmarks.input_pipeline import loader_images_per_second

    config = binax.data.default_config()
    note = None
    if name is None:
        config.name = "imagenet2012"
        try:
            ds = binax.data.create(config, seed=0)
        except FileNotFoundError:
            note = "imagenet2012 is not built in tfds's data_dir: measured fashion_mnist instead"
            config.name = "fashion_mnist"
            ds = binax.data.create(config, seed=0)
    else:
        config.name = name
        ds = binax.data.create(config, seed=0)
    record = loader_images_per_second(ds, batch, max_steps=steps)
    return {
        "benchmark": "host_pipeline",
        "dataset": config.name,
        "batch_size": batch,
        "host_cores": os.cpu_count(),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()},
        **({"note": note} if note else {}),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shapes, two timed steps")
    p.add_argument("--batch", type=int, default=None, help="train batch (default 256; --quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --quick: 2)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--pipeline", default=None, help="binax.data name for the host pipeline record")
    args = p.parse_args(argv)
    batch = args.batch or (2 if args.quick else 256)
    steps = args.steps or (2 if args.quick else 20)
    image = 32 if args.quick else 224
    if batch % jax.device_count():
        raise SystemExit(f"error: --batch={batch} must be a multiple of the {jax.device_count()} devices")
    emit(device_record())
    vgg_state = vgg_config = None
    for dtype in args.dtypes.split(","):
        times = {}
        for network in ("resnet18_irnet", "resnet18_float", "vgg_small"):
            config = step_config(network, dtype, batch=batch, quick=args.quick, image=image)
            record, state = time_train_step(config, steps)
            times[network] = record["step_ms"]
            emit({"benchmark": "train_step", "network": network, **record})
            if network == "vgg_small" and vgg_state is None:  # the first dtype's (float32 by default)
                vgg_state, vgg_config = state, config
        emit({
            "benchmark": "binary_vs_float",
            "network": "resnet18",
            "compute_dtype": dtype,
            "binary_step_over_float_step": round(times["resnet18_irnet"] / times["resnet18_float"], 4),
        })
    if vgg_state is not None:
        emit(packed_inference(vgg_config, vgg_state, batch=batch, steps=steps))
    emit(host_pipeline(args.pipeline, batch=batch if not args.quick else 32, steps=steps * 5))


if __name__ == "__main__":
    main()
