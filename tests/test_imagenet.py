"""ImageNet in its real archive format, small (binax.data.fake_imagenet), through tfds' own
imagenet2012 builder and the ImageNet recipes: the build, the archive checks, a learning
run killed with SIGKILL and resumed to the same records, a few steps at 224x224, and the
per-process shards of a 2-process run.

The fake archive is built once per test session (both pytest-xdist workers share it
under a file lock), in a cache keyed by the generator's source and parameters.
"""

import colorsys
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from binax.data import fake_imagenet, imagenet_archive
from binax.errors import DataError, MissingDataError
from binax.train import read_metrics

tfds = pytest.importorskip("tensorflow_datasets")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = fake_imagenet.FakeImagenet(val_images=50, train_per_class=20, seed=0)


def _cache_key() -> str:
    with open(fake_imagenet.__file__, "rb") as f:
        source = f.read()
    words = repr((SPEC, tfds.__version__)).encode()
    return hashlib.sha256(source + words).hexdigest()[:16]


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    """``(manual_dir, data_dir)`` of the fake ImageNet, built once for all workers."""
    # The parent of the basetemp is shared by the xdist workers of one session.
    root = tmp_path_factory.getbasetemp().parent / f"binax-fake-imagenet-{_cache_key()}"
    ready = root / "ready"
    os.makedirs(root.parent, exist_ok=True)
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            shutil.rmtree(root, ignore_errors=True)
            fake_imagenet.write_archives(str(root / "manual"), SPEC)
            imagenet_archive.build(str(root / "manual"), str(root / "data"))
            ready.touch()
    return str(root / "manual"), str(root / "data")


# ------------------------------------------------------------------ the build


def _hue(image: np.ndarray) -> float:
    return colorsys.rgb_to_hsv(*(image.reshape(-1, 3).mean(0) / 255.0))[0]


def test_fake_archive_builds_through_tfds_imagenet2012_builder(fake):
    from PIL import Image

    _, data_dir = fake
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    synsets = fake_imagenet.class_synsets(SPEC, fake_imagenet.validation_labels())
    assert builder.info.splits["train"].num_examples == len(synsets) * SPEC.train_per_class
    assert builder.info.splits["validation"].num_examples == SPEC.val_images
    names = builder.info.features["label"].names

    val = list(tfds.as_numpy(builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})))
    labels = fake_imagenet.validation_labels()
    by_name = {ex["file_name"].decode(): ex for ex in val}
    # The builder labels the n-th sorted name with the n-th line of validation_labels.txt.
    assert [names[by_name[n]["label"]] for n in sorted(by_name)] == labels[: SPEC.val_images]
    # ...and each image is a picture of that class: its mean hue is the class hue.
    hues = [(i * 0.618034) % 1.0 for i in range(len(synsets))]
    hits = gray = 0
    for ex in val:
        image = np.asarray(Image.open(io.BytesIO(ex["image"])))
        if image.ndim == 2:
            gray += 1
            continue
        h = _hue(image)
        nearest = min(range(len(hues)), key=lambda i: min(abs(h - hues[i]), 1 - abs(h - hues[i])))
        hits += synsets[nearest] == names[ex["label"]]
    assert gray >= 2 and hits >= 0.9 * (len(val) - gray)

    # The builder repaired the CMYK and PNG files it knows by name into RGB JPEGs.
    train = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
    special = set(fake_imagenet.CMYK_NAMES) | {fake_imagenet.PNG_NAME}
    found = {}
    for ex in tfds.as_numpy(train):
        name = ex["file_name"].decode()
        assert name.startswith(names[ex["label"]] + "_")
        if name in special:
            picture = Image.open(io.BytesIO(ex["image"]))
            found[name] = (picture.format, picture.mode)
    assert found == {name: ("JPEG", "RGB") for name in special}
    manual_dir, _ = fake
    with tarfile.open(os.path.join(manual_dir, fake_imagenet.TRAIN_TAR)) as outer:
        inner = tarfile.open(fileobj=outer.extractfile("n01739381.tar"))
        picture = Image.open(inner.extractfile("n01739381_1309.JPEG"))
        assert (picture.format, picture.mode) == ("JPEG", "CMYK")  # as written: CMYK


# ------------------------------------------------------------------ bad archives


def _tar(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


JPEG = fake_imagenet.encode(np.zeros((8, 8, 3), np.uint8), "rgb")
CLASS_TARS = [("n01440764.tar", _tar([("n01440764_1.JPEG", JPEG)] * 3)), ("n01443537.tar", _tar([("n01443537_1.JPEG", JPEG)]))]
GOOD_TRAIN = _tar(CLASS_TARS)
# Where the members' data ends (header 512 bytes, data padded to 512): a file cut there
# is a valid tar up to that point, which tarfile reads without complaint.
FIRST_END = 512 + len(CLASS_TARS[0][1])
LAST_END = FIRST_END + 512 + len(CLASS_TARS[1][1])
GOOD_VAL = _tar([(f"ILSVRC2012_val_{i:08d}.JPEG", JPEG) for i in (1, 2)])


def _manual(tmp_path, train=GOOD_TRAIN, val=GOOD_VAL):
    for name, data in ((imagenet_archive.TRAIN_TAR, train), (imagenet_archive.VAL_TAR, val)):
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return str(tmp_path)


def test_good_archives_pass_the_check(tmp_path):
    assert imagenet_archive.check_archives(_manual(tmp_path)) == {"train": 4, "validation": 2}


def test_missing_archive_is_named(tmp_path):
    with pytest.raises(MissingDataError, match="ILSVRC2012_img_val.tar is missing.*image-net.org"):
        imagenet_archive.check_archives(_manual(tmp_path, val=None))


@pytest.mark.parametrize(
    "cut",
    [
        len(GOOD_TRAIN) // 2,  # inside a member's data
        FIRST_END,  # at a member boundary
        LAST_END,  # before the end-of-archive marker
        LAST_END + 512,  # inside it
        100,  # inside the first header
    ],
    ids=["data", "member_boundary", "no_end_marker", "half_end_marker", "header"],
)
def test_truncated_archive_is_reported(tmp_path, cut):
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar: the archive is truncated"):
        imagenet_archive.check_archives(_manual(tmp_path, train=GOOD_TRAIN[:cut]))


def test_truncated_class_tar_is_reported(tmp_path):
    short = _tar([("n01440764_1.JPEG", JPEG)] * 3)[:1200]
    train = _tar([("n01440764.tar", short)])
    with pytest.raises(DataError, match="member 'n01440764.tar' is truncated"):
        imagenet_archive.check_archives(_manual(tmp_path, train=train))


@pytest.mark.parametrize(
    "train, message",
    [
        (_tar([("n01440764.tar", JPEG * 4)]), "member 'n01440764.tar' is not a tar archive"),
        (_tar([("n01440764_1.JPEG", JPEG)]), "member 'n01440764_1.JPEG' is not a per-synset tar"),
        (b"not a tar" * 200, "the archive is not a tar archive"),
    ],
    ids=["class_tar_is_a_jpeg", "jpeg_instead_of_class_tar", "archive_not_a_tar"],
)
def test_archive_of_the_wrong_format_is_reported(tmp_path, train, message):
    with pytest.raises(DataError, match=message):
        imagenet_archive.check_archives(_manual(tmp_path, train=train))


def test_validation_archive_holds_only_jpegs(tmp_path):
    val = _tar([("ILSVRC2012_val_00000001.JPEG", JPEG), ("readme.txt", b"hi")])
    with pytest.raises(DataError, match="member 'readme.txt' is not a .JPEG file"):
        imagenet_archive.check_archives(_manual(tmp_path, val=val))


def test_command_line_prints_one_error_line(tmp_path, capsys):
    manual = _manual(tmp_path, train=GOOD_TRAIN[: len(GOOD_TRAIN) // 2])
    assert imagenet_archive.main(["--manual_dir", manual, "--data_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "truncated" in err[0]
    assert not (tmp_path / "d").exists()  # checked before tfds started


def test_validation_archive_with_more_images_than_tfds_labels_is_refused(tmp_path, monkeypatch):
    # tfds zips the sorted names with its 50000 labels: extra images would lose theirs.
    monkeypatch.setattr(imagenet_archive, "NUM_VAL_LABELS", 1)
    with pytest.raises(DataError, match="2 images, but tfds labels 1"):
        imagenet_archive.check_archives(_manual(tmp_path))
