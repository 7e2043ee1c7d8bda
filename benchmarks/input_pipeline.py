"""Input-pipeline throughput: training images per second the binax.data loaders deliver.

Prints one JSON line per measurement::

    python -m benchmarks.input_pipeline                  # fashion_mnist + cifar10, batch 128
    python -m benchmarks.input_pipeline --datasets digits --max_steps 50
    taskset -c 0 python -m benchmarks.input_pipeline --imagenet_data_dir DIR   # ImageNet, 1 core

``cifar10`` is read from tfds's data_dir when it has been built there, otherwise from
``tfds.testing.mock_data`` (``"source": "mock"``); the mock's Python generator encodes a
PNG per example, so its figure is a lower bound on what the real files give.
:func:`loader_images_per_second` is the measuring function; a train-step comparison can
reuse it.

With ``--imagenet_data_dir`` (a tfds data_dir holding ``imagenet2012``: the real one, or
the small one ``python -m binax.data.fake_imagenet`` builds in the same format), it
measures ImageNet's train and eval pipelines against the decode-only limit on the same
files and cores instead, in interleaved rounds (the ratios within a round are what
counts on a shared machine); ``taskset`` sets the cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import binax.data


def loader_images_per_second(dataset, batch_size: int = 128, *, epoch: int = 0,
                             max_steps: int | None = None, warmup_steps: int = 2) -> dict:
    """Times ``dataset.train_batches(epoch, batch_size)`` with nothing consuming the batches.

    The first ``warmup_steps`` batches (pipeline start-up, TF tracing, file opening) are
    timed separately as ``first_batches_s``; ``images_per_s`` counts the process-local
    images of the ``steps`` batches after them.
    """
    total = dataset.steps_per_epoch(batch_size)
    steps = total - warmup_steps if max_steps is None else min(max_steps, total - warmup_steps)
    if steps <= 0:
        raise ValueError(
            f"{dataset.name}: {total} steps at batch_size={batch_size} leave none after "
            f"{warmup_steps} warm-up steps")
    start = time.perf_counter()
    batches = dataset.train_batches(epoch, batch_size)
    for _ in range(warmup_steps):
        next(batches)
    warm = time.perf_counter()
    images = 0
    for _ in range(steps):
        images += len(next(batches)["label"])
    end = time.perf_counter()
    return {
        "steps": steps,
        "images_per_s": images / (end - warm),
        "seconds": end - warm,
        "first_batches_s": warm - start,
    }


def _mock(num_examples: int):
    import tensorflow_datasets as tfds

    return tfds.testing.mock_data(num_examples=num_examples)


def measure(name: str, *, batch_size: int = 128, max_steps: int | None = 200,
            mock_examples: int = 4096, seed: int = 0, **config_overrides) -> dict:
    """One benchmark record for dataset ``name`` (tfds sets fall back to mock data)."""
    config = binax.data.default_config()
    config.name = name
    for key, value in config_overrides.items():
        config[key] = value
    source = binax.data.get_spec(name).source
    context, dataset = contextlib.nullcontext(), None
    start = time.perf_counter()
    if source == "tfds":
        try:
            dataset = binax.data.create(config, seed=seed)
        except FileNotFoundError:  # not built in tfds's data_dir
            source, context = "mock", _mock(mock_examples)
    with context:
        if dataset is None:
            dataset = binax.data.create(config, seed=seed)
        create_s = time.perf_counter() - start
        record = loader_images_per_second(dataset, batch_size, max_steps=max_steps)
    augment = getattr(dataset, "augment", None)
    return {
        "benchmark": "input_pipeline",
        "dataset": name,
        "source": source,
        "batch_size": batch_size,
        "augment": augment,
        "normalize": config.normalize,
        "num_train": dataset.num_train,
        "create_s": round(create_s, 4),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()},
        "cpu_count": os.cpu_count(),
    }


# -- ImageNet: the pipeline against the decode-only limit --------------------------------


def _imagenet_dataset(data_dir: str, image_size: int | None, seed: int = 0):
    config = binax.data.default_config()
    config.name, config.data_dir, config.image_size = "imagenet2012", data_dir, image_size
    return binax.data.create(config, seed=seed)


def _count(batches, min_images: int, make) -> tuple[int, float]:
    """Images and seconds to draw at least ``min_images`` from ``batches`` (re-made by
    ``make(round)`` when one runs out); the first batch (start-up) is not timed."""
    images, round_ = 0, 0
    next(batches)
    start = time.perf_counter()
    while images < min_images:
        for batch in batches:
            images += len(batch["label"]) if isinstance(batch, dict) else len(batch)
            if images >= min_images:
                break
        else:
            round_ += 1
            batches = make(round_)
    return images, time.perf_counter() - start


def imagenet_rates(data_dir: str, *, batch_size: int = 64, min_images: int = 2000,
                   image_size: int | None = None) -> dict[str, float]:
    """Images/s of binax's ImageNet train and eval pipelines and of decode-only.

    decode-only reads the same TFRecords through tfds and runs ``tf.io.decode_jpeg`` on
    every full image, batched, with the same tf.data parallelism (AUTOTUNE) on the same
    cores: what a pipeline that decodes whole images cannot exceed. binax's train
    pipeline decodes only its random crop window (``tf.image.decode_and_crop_jpeg``),
    resizes, flips and normalizes; eval decodes the central crop and resizes.
    """
    from binax.data.tfds_pipeline import import_tf

    tf, tfds = import_tf()
    ds = _imagenet_dataset(data_dir, image_size)
    builder = tfds.builder("imagenet2012", data_dir=data_dir)

    def decode_only(round_):
        records = builder.as_dataset(split="train", shuffle_files=False,
                                     decoders={"image": tfds.decode.SkipDecoding()})
        # Full images differ in size and would not batch: each yields its decoded shape
        # (which needs the whole decode), so the limit is decode alone, not a copy.
        shapes = records.map(lambda ex: tf.shape(tf.io.decode_jpeg(ex["image"], channels=3)),
                             num_parallel_calls=tf.data.AUTOTUNE)
        return iter(tfds.as_numpy(shapes.batch(batch_size).prefetch(tf.data.AUTOTUNE)))

    def uint8_train(round_):
        ds.normalize_on_host = False
        try:
            return ds.train_batches(round_, batch_size)  # the pipeline is built here
        finally:
            ds.normalize_on_host = True

    makers = {
        "decode_only": decode_only,
        "train": lambda round_: ds.train_batches(round_, batch_size),
        # The same without the host's float32 normalization (uint8 batches).
        "train_uint8": uint8_train,
        "eval": lambda round_: ds.eval_batches(batch_size),
    }
    rates = {}
    for name, make in makers.items():
        images, seconds = _count(make(0), min_images, make)
        rates[name] = images / seconds
    return rates


def imagenet_benchmark(data_dir: str, *, rounds: int = 3, **kwargs):
    """Yields a record per pipeline and round, then the medians and ratios."""
    import statistics

    cores = len(os.sched_getaffinity(0))
    per_round = []
    for r in range(rounds):
        rates = imagenet_rates(data_dir, **kwargs)
        per_round.append(rates)
        for name, rate in rates.items():
            yield {"benchmark": "imagenet_pipeline", "pipeline": name, "round": r,
                   "images_per_s": round(rate, 1), "images_per_s_per_core": round(rate / cores, 1),
                   "cores": cores}
    median = {name: statistics.median(r[name] for r in per_round) for name in per_round[0]}
    yield {
        "benchmark": "imagenet_pipeline", "summary": True, "cores": cores, "rounds": rounds,
        **{f"{name}_images_per_s_per_core": round(rate / cores, 1) for name, rate in median.items()},
        # Ratios per round (the same load on the machine), then their median.
        "train_vs_decode_only": round(statistics.median(r["train"] / r["decode_only"] for r in per_round), 3),
        "train_uint8_vs_decode_only": round(
            statistics.median(r["train_uint8"] / r["decode_only"] for r in per_round), 3),
        "eval_vs_decode_only": round(statistics.median(r["eval"] / r["decode_only"] for r in per_round), 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="fashion_mnist,cifar10",
                        help="comma-separated binax.data names")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_steps", type=int, default=200,
                        help="timed steps per dataset (after 2 warm-up steps)")
    parser.add_argument("--mock_examples", type=int, default=4096,
                        help="examples of tfds mock data when a tfds set is not built")
    parser.add_argument("--augment", choices=("default", "on", "off"), default="default")
    parser.add_argument("--imagenet_data_dir", default=None,
                        help="a tfds data_dir holding imagenet2012 (real, or built by "
                        "python -m binax.data.fake_imagenet): measure its train and eval "
                        "pipelines against decode-only instead")
    parser.add_argument("--image_size", type=int, default=None, help="ImageNet: data.image_size")
    parser.add_argument("--min_images", type=int, default=2000, help="ImageNet: images per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="ImageNet: interleaved rounds")
    args = parser.parse_args(argv)
    if args.imagenet_data_dir:
        for record in imagenet_benchmark(args.imagenet_data_dir, rounds=args.rounds,
                                         batch_size=args.batch_size, min_images=args.min_images,
                                         image_size=args.image_size):
            print(json.dumps(record), flush=True)
        return
    overrides = {} if args.augment == "default" else {"augment": args.augment == "on"}
    for name in args.datasets.split(","):
        record = measure(name.strip(), batch_size=args.batch_size, max_steps=args.max_steps,
                         mock_examples=args.mock_examples, **overrides)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
