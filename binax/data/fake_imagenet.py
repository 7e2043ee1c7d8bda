"""A small ImageNet in the real archive format, to smoke-test the ImageNet path without
the 150 GB download.

::

    python -m binax.data.fake_imagenet --data_dir /tmp/fake_tfds     # 20-30 s on 2 cores
    python -m experiments.run --config configs/recipe.py:method=bireal,dataset=imagenet2012,quick \\
        --config.data.data_dir=/tmp/fake_tfds --config.data.image_size=48 --workdir runs/fake

writes ``ILSVRC2012_img_train.tar`` (one inner tar ``nXXXXXXXX.tar`` of JPEG files per
synset) and ``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_00000001.JPEG``, ...) into
``<data_dir>/downloads/manual/`` and builds them with tfds' own ``imagenet2012`` builder
(:func:`binax.data.imagenet_archive.build`), as a user builds the real archive.

What it keeps from the real archive: image sides drawn from 60 to 500 px (so sizes and
aspect ratios vary), a few grayscale JPEGs, CMYK JPEGs and one PNG stored under a
``.JPEG`` name. The builder repairs CMYK and PNG files only by name (its ``CMYK_IMAGES``
and ``PNG_IMAGES`` lists), so those files carry names from the lists.

Labels follow the builder. It labels the validation images by zipping the SORTED names
in the val tar with the lines of its ``validation_labels.txt``, so the ``n``-th val image
has the class of the ``n``-th line whatever its name: the classes are the synsets of the
first ``val_images`` lines (plus those of the CMYK names used), and each val image is
drawn from the class the builder will give it. Every class is a distinct pattern (a hue
and a stripe orientation, under random crops, brightness and noise), so a short
training run is well above chance if and only if images and labels stay aligned.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
import tarfile
from typing import Iterator

import numpy as np

from binax import files
from binax.errors import BinaxError, ConfigError

# tfds' imagenet2012 builder (tensorflow_datasets/datasets/imagenet2012/
# imagenet2012_dataset_builder.py, CMYK_IMAGES and PNG_IMAGES): the files it converts.
CMYK_NAMES = ("n01739381_1309.JPEG", "n02077923_14822.JPEG")
PNG_NAME = "n02105855_2933.JPEG"
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
MIN_SIDE, MAX_SIDE = 60, 500
GRAY_EVERY = 16  # one image in 16 is a grayscale JPEG, as a few real ones are
VERSION = 1  # of the images written; part of the test cache key


@dataclasses.dataclass(frozen=True)
class FakeImagenet:
    """What :func:`write_archives` writes: ``val_images`` validation images, whose labels
    (the first lines of tfds' validation_labels.txt) fix the classes, and
    ``train_per_class`` training images of every class; ``seed`` fixes the pixels."""

    val_images: int = 20
    train_per_class: int = 40
    seed: int = 0

    def __post_init__(self):
        for key in ("val_images", "train_per_class"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 1 <= value <= 50_000:
                raise ConfigError(f"{key}={value!r} must be an integer in [1, 50000]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer")


def validation_labels() -> list[str]:
    """The synset of each val image, in sorted-name order, as tfds' builder reads it."""
    from tensorflow_datasets.core import utils

    path = utils.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()


def class_synsets(spec: FakeImagenet, labels: list[str]) -> list[str]:
    """The sorted synsets with images: those of the first val labels and of the CMYK names."""
    return sorted(set(labels[: spec.val_images]) | {n.split("_")[0] for n in CMYK_NAMES})


def class_hue(index: int, num_classes: int) -> float:
    """The hue (0..1) of class ``index``: pairs of classes share one of ``ceil(C/2)``
    evenly spaced hues and differ in stripe orientation."""
    return (index // 2) / -(-num_classes // 2)


def class_image(rng: np.random.Generator, index: int, num_classes: int, height: int,
                width: int) -> np.ndarray:
    """A ``(height, width, 3)`` uint8 image of class ``index`` of ``num_classes``.

    The class sets a hue (:func:`class_hue`), the stripe orientation (horizontal or
    vertical: a left-right flip keeps it) and a stripe period relative to the shorter
    side; the image adds a random phase, saturation, brightness and pixel noise, and the
    training pipeline adds random crops.
    """
    vertical = index % 2 == 1
    period = min(height, width) / (3 + 4 * ((index // 2) % 3))
    axis = np.arange(width if vertical else height, dtype=np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * axis / period + rng.uniform(0, 2 * np.pi))
    wave = wave[None, :] if vertical else wave[:, None]
    value = rng.uniform(0.75, 1.0) * (0.6 + 0.4 * wave)  # (h, 1) or (1, w)
    rgb = _hsv_to_rgb(class_hue(index, num_classes), rng.uniform(0.75, 1.0))  # (3,)
    image = value[..., None] * rgb  # broadcast to (h, w, 3)
    image = np.broadcast_to(image, (height, width, 3)) * 255.0
    image = image + rng.normal(0.0, 8.0, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _hsv_to_rgb(hue: float, saturation: float) -> np.ndarray:
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb(hue, saturation, 1.0), np.float32)


def encode(image: np.ndarray, kind: str) -> bytes:
    """``image`` as a file: ``'rgb'``, ``'gray'`` or ``'cmyk'`` JPEG, or ``'png'``."""
    from PIL import Image

    picture = Image.fromarray(image, "RGB")
    if kind == "gray":
        picture = picture.convert("L")
    elif kind == "cmyk":
        picture = picture.convert("CMYK")
    out = io.BytesIO()
    if kind == "png":
        picture.save(out, format="PNG")
    else:
        picture.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _random_image(rng: np.random.Generator, index: int, num_classes: int) -> np.ndarray:
    height, width = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2)
    return class_image(rng, index, num_classes, int(height), int(width))


def train_files(spec: FakeImagenet, synsets: list[str]) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """``(synset, [(file name, bytes), ...])`` for every class, in synset order."""
    special = {name: "cmyk" for name in CMYK_NAMES}
    special[PNG_NAME] = "png"
    for index, synset in enumerate(synsets):
        rng = np.random.default_rng([spec.seed, 0, index])
        names = [n for n in special if n.startswith(synset + "_")]
        number = 0
        while len(names) < spec.train_per_class:
            number += 1
            name = f"{synset}_{number}.JPEG"
            if name not in special:
                names.append(name)
        files = []
        for k, name in enumerate(names):
            kind = special.get(name, "gray" if k % GRAY_EVERY == GRAY_EVERY - 1 else "rgb")
            files.append((name, encode(_random_image(rng, index, len(synsets)), kind)))
        yield synset, files


def val_files(spec: FakeImagenet, synsets: list[str], labels: list[str]) -> Iterator[tuple[str, bytes]]:
    """``(ILSVRC2012_val_%08d.JPEG, bytes)``: image ``n`` of the class of label line ``n``."""
    index = {s: i for i, s in enumerate(synsets)}
    rng = np.random.default_rng([spec.seed, 1])
    for n in range(spec.val_images):
        kind = "gray" if n % GRAY_EVERY == GRAY_EVERY - 1 else "rgb"
        yield f"ILSVRC2012_val_{n + 1:08d}.JPEG", encode(_random_image(rng, index[labels[n]], len(synsets)), kind)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_340_000_000  # fixed: the archive is a pure function of the spec
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            _add(tar, name, data)
    return out.getvalue()


def write_archives(manual_dir: str, spec: FakeImagenet = FakeImagenet()) -> dict:
    """Writes the two archives into ``manual_dir``; returns ``{'classes', 'train', 'val'}``."""
    labels = validation_labels()
    synsets = class_synsets(spec, labels)
    os.makedirs(manual_dir, exist_ok=True)
    num_train = 0

    def write_train(f):
        nonlocal num_train
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for synset, members in train_files(spec, synsets):
                num_train += len(members)
                _add(tar, f"{synset}.tar", _tar_bytes(members))

    def write_val(f):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in val_files(spec, synsets, labels):
                _add(tar, name, data)

    files.write_with(os.path.join(manual_dir, TRAIN_TAR), write_train)
    files.write_with(os.path.join(manual_dir, VAL_TAR), write_val)
    return {"classes": synsets, "train": num_train, "val": spec.val_images}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m binax.data.fake_imagenet",
        description="Write a small ImageNet in the real archive format and build it with "
        "tfds' imagenet2012 builder.",
    )
    parser.add_argument("--data_dir", required=True,
                        help="tfds data_dir to build into (not the one of the real ImageNet: "
                        "a prepared imagenet2012 there would be this one)")
    parser.add_argument("--manual_dir", default=None,
                        help="where the archives go (default: <data_dir>/downloads/manual)")
    parser.add_argument("--val_images", type=int, default=FakeImagenet.val_images)
    parser.add_argument("--train_per_class", type=int, default=FakeImagenet.train_per_class)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_build", action="store_true", help="only write the archives")
    args = parser.parse_args(argv)
    from binax.data import imagenet_archive

    manual_dir = args.manual_dir or os.path.join(args.data_dir, "downloads", "manual")
    try:
        spec = FakeImagenet(args.val_images, args.train_per_class, args.seed)
        written = write_archives(manual_dir, spec)
        print(f"wrote {written['train']} training images of {len(written['classes'])} classes "
              f"and {written['val']} validation images to {manual_dir}", flush=True)
        if not args.no_build:
            sizes = imagenet_archive.build(manual_dir, args.data_dir)
            print(f"built imagenet2012 in {args.data_dir}: {sizes}", flush=True)
    except BinaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
