"""Input-pipeline throughput: training images per second the binax.data loaders deliver.

Prints one JSON line per measurement::

    python benchmarks/input_pipeline.py                  # fashion_mnist + cifar10, batch 128
    python benchmarks/input_pipeline.py --datasets digits --max_steps 50

``cifar10`` is read from tfds's data_dir when it has been built there, otherwise from
``tfds.testing.mock_data`` (``"source": "mock"``); the mock's Python generator encodes a
PNG per example, so its figure is a lower bound on what the real files give.
:func:`loader_images_per_second` is the measuring function; a train-step comparison can
reuse it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout without installing binax
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import binax.data  # noqa: E402


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
    args = parser.parse_args(argv)
    overrides = {} if args.augment == "default" else {"augment": args.augment == "on"}
    for name in args.datasets.split(","):
        record = measure(name.strip(), batch_size=args.batch_size, max_steps=args.max_steps,
                         mock_examples=args.mock_examples, **overrides)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
