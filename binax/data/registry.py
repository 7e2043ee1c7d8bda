"""The dataset registry: name -> :class:`~binax.data.spec.Spec`."""

from __future__ import annotations

from binax.data.spec import Spec
from binax.errors import ConfigError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_TFDS_BUILD = (
    "Build it once with `tfds build {tfds_name} --data_dir={data_dir}` (or in Python: "
    "tfds.builder('{tfds_name}', data_dir='{data_dir}').download_and_prepare()), or set "
    "config.data.data_dir to a directory that already holds it."
)

_SPECS = (
    Spec(
        name="fashion_mnist",
        source="idx",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        crop_pad=2,
        flip=True,  # garments are left-right symmetric as classes (a mirrored shoe is a shoe)
        install_hint=(
            "Install Debian's package with `sudo apt-get install dataset-fashion-mnist` "
            f"(it puts the files in {FASHION_MNIST_DIR}), or download the four .gz files "
            "from https://github.com/zalandoresearch/fashion-mnist and set "
            "config.data.data_dir to their directory."
        ),
    ),
    Spec(
        name="mnist",
        source="idx",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        crop_pad=2,
        flip=False,  # a mirrored digit is not the same digit
        install_hint=(
            "MNIST has no default location: download train-images-idx3-ubyte.gz, "
            "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
            "t10k-labels-idx1-ubyte.gz (https://yann.lecun.com/exdb/mnist/ or a mirror "
            "such as https://ossci-datasets.s3.amazonaws.com/mnist/) into one directory and "
            "set config.data.data_dir to it; or use name='tfds:mnist'."
        ),
    ),
    Spec(
        name="digits",
        source="digits",
        image_shape=(8, 8, 1),
        num_classes=10,
        # Statistics of the 1500 training images scaled by 1/16.
        mean=(0.3051,),
        std=(0.3750,),
        max_value=16,
        crop_pad=1,
        flip=False,
        install_hint="scikit-learn ships the digits; install it with `pip install scikit-learn`.",
    ),
    Spec(
        name="cifar10",
        source="tfds",
        image_shape=(32, 32, 3),
        num_classes=10,
        # Per-channel mean and (population) std of the 50000 training images.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        augment_default=True,
        crop_pad=4,
        flip=True,
        tfds_name="cifar10",
        install_hint=_TFDS_BUILD,
    ),
    Spec(
        name="cifar100",
        source="tfds",
        image_shape=(32, 32, 3),
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        augment_default=True,
        crop_pad=4,
        flip=True,
        tfds_name="cifar100",
        install_hint=_TFDS_BUILD,
    ),
    Spec(
        name="imagenet2012",
        source="tfds",
        image_shape=(224, 224, 3),
        num_classes=1000,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        augment_default=True,
        flip=True,
        tfds_name="imagenet2012",
        test_split="validation",
        inception_crop=True,
        install_hint=(
            "ImageNet needs a manual download: register at "
            "https://image-net.org/download-images, put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in a directory DIR, then run `python -m "
            "binax.data.imagenet_archive --manual_dir DIR --data_dir {data_dir}` (it checks "
            "the archives, then runs tfds' builder). To smoke-test without the download: "
            "`python -m binax.data.fake_imagenet --data_dir OTHER_DIR` and "
            "config.data.data_dir=OTHER_DIR."
        ),
    ),
    Spec(
        name="synthetic",
        source="synthetic",
        # The defaults; config.data.image_shape / num_classes set others (binax.data.synthetic).
        image_shape=(224, 224, 3),
        num_classes=1000,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        install_hint="synthetic batches are drawn on the devices; there is nothing to install.",
    ),
    Spec(
        name="tfds:mnist",
        source="tfds",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        crop_pad=2,
        flip=False,
        tfds_name="mnist",
        install_hint=_TFDS_BUILD,
    ),
    Spec(
        name="tfds:fashion_mnist",
        source="tfds",
        image_shape=(28, 28, 1),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        crop_pad=2,
        flip=True,
        tfds_name="fashion_mnist",
        install_hint=_TFDS_BUILD,
    ),
)

SPECS = {spec.name: spec for spec in _SPECS}


def names() -> list[str]:
    """The registered dataset names (any other ``'tfds:<builder>'`` is accepted too)."""
    return sorted(SPECS)


def get_spec(name: str) -> Spec:
    """The :class:`Spec` of ``name``.

    ``'tfds:<builder>'`` names a registered tfds dataset by its builder (``'tfds:cifar10'``
    is ``'cifar10'``) or, for any other builder, a generic spec whose shape and classes are
    read from the builder's features when the dataset is created.
    """
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {name!r}")
    if name in SPECS:
        return SPECS[name]
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        builder = name[len("tfds:"):]
        for spec in _SPECS:
            if spec.source == "tfds" and spec.tfds_name == builder:
                return spec
        return Spec(
            name=name,
            source="tfds",
            image_shape=None,
            num_classes=None,
            tfds_name=builder,
            install_hint=_TFDS_BUILD,
        )
    raise ConfigError(
        f"unknown dataset {name!r}; valid names are {names()} or 'tfds:<builder name>'"
    )
