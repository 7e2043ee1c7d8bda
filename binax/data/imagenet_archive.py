"""ImageNet's archives, checked before tfds' builder reads them, and the build itself.

::

    python -m binax.data.imagenet_archive --manual_dir ~/imagenet --data_dir ~/tensorflow_datasets

The real build reads 150 GB for hours; :func:`check_archives` walks the tar headers
first (seconds to a minute: it seeks, it does not read the images) so that a missing
archive, one cut short by an interrupted download, or a training archive whose members
are not the per-synset tars fails at once with one line naming the file, instead of as a
tfds traceback hours in. :func:`build` then runs tfds' own ``imagenet2012`` builder on
the manual directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile

from binax.errors import BinaxError, DataError, MissingDataError

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
NUM_VAL_LABELS = 50_000  # lines of tfds' validation_labels.txt
_BLOCK = 512
_DOWNLOAD = ("register at https://image-net.org/download-images and put "
             f"{TRAIN_TAR} and {VAL_TAR} there (or write a small fake one: "
             "python -m binax.data.fake_imagenet --data_dir DIR)")


def _truncated(path: str, what: str) -> DataError:
    return DataError(f"{path}: {what} is truncated (the download stopped early?); "
                     "download it again")


def _walk(fileobj, size: int, path: str, what: str) -> list[tarfile.TarInfo]:
    """The members of the tar in ``fileobj`` (``size`` bytes), checked complete.

    tarfile stops quietly at a file cut at a member boundary, and never checks that the
    last member's data is all there; so the last member's data must be followed by the
    end-of-archive marker (two zero blocks) that tar writes.
    """
    fileobj.seek(0)
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.ReadError as e:
        if 0 < size < _BLOCK or "unexpected end" in str(e) or "truncated" in str(e):
            raise _truncated(path, what) from None
        raise DataError(f"{path}: {what} is not a tar archive ({e})") from None
    if not members:
        raise DataError(f"{path}: {what} is empty (a tar archive with no member)")
    end = max(m.offset_data + -(-m.size // _BLOCK) * _BLOCK for m in members)
    fileobj.seek(end)  # past the last member's data: a short read there is a cut file
    if fileobj.read(2 * _BLOCK) != bytes(2 * _BLOCK):
        raise _truncated(path, what)
    return members


def _open(manual_dir: str, name: str):
    path = os.path.join(manual_dir, name)
    if not os.path.isfile(path):
        raise MissingDataError(f"ImageNet archive {path} is missing: {_DOWNLOAD}")
    return path, open(path, "rb")


def check_train(path: str) -> int:
    """Checks the training archive (one complete tar per synset); returns its image count."""
    images = 0
    with open(path, "rb") as f:
        members = _walk(f, os.fstat(f.fileno()).st_size, path, "the archive")
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as outer:
            for member in members:
                what = f"member {member.name!r}"
                if not (member.isfile() and member.name.endswith(".tar")):
                    raise DataError(f"{path}: {what} is not a per-synset tar (nXXXXXXXX.tar); "
                                    f"{TRAIN_TAR} holds one tar of JPEGs per class")
                inner = outer.extractfile(member)
                images += sum(m.isfile() for m in _walk(inner, member.size, path, what))
    return images


def check_val(path: str) -> int:
    """Checks the validation archive (JPEG files only); returns its image count."""
    with open(path, "rb") as f:
        members = _walk(f, os.fstat(f.fileno()).st_size, path, "the archive")
    for member in members:
        if not (member.isfile() and member.name.endswith(".JPEG")):
            raise DataError(f"{path}: member {member.name!r} is not a .JPEG file; "
                            f"{VAL_TAR} holds the validation images only")
    if len(members) > NUM_VAL_LABELS:
        raise DataError(f"{path}: {len(members)} images, but tfds labels "
                        f"{NUM_VAL_LABELS} (its validation_labels.txt)")
    return len(members)


def check_archives(manual_dir: str) -> dict[str, int]:
    """``{'train': images, 'validation': images}`` of the two archives in ``manual_dir``.

    Raises:
      MissingDataError: an archive is not there.
      DataError: an archive is truncated or not a tar, a training member is not a complete
        per-synset tar, a validation member is not a .JPEG file.
    """
    counts = {}
    for split, name, check in (("train", TRAIN_TAR, check_train), ("validation", VAL_TAR, check_val)):
        path, f = _open(manual_dir, name)
        f.close()
        counts[split] = check(path)
    return counts


def build(manual_dir: str, data_dir: str) -> dict[str, int]:
    """Checks the archives, then builds tfds' ``imagenet2012`` from them into ``data_dir``.

    Returns the example count of each split as tfds recorded it. A ``data_dir`` that
    already holds a prepared ``imagenet2012`` is left as it is (tfds' rule).
    """
    from binax.data.tfds_pipeline import import_tf

    check_archives(manual_dir)
    _, tfds = import_tf()
    builder = tfds.builder("imagenet2012", data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m binax.data.imagenet_archive",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--manual_dir", required=True,
                        help=f"the directory holding {TRAIN_TAR} and {VAL_TAR}")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (default: tfds's own)")
    parser.add_argument("--check_only", action="store_true", help="check, do not build")
    args = parser.parse_args(argv)
    try:
        if args.check_only:
            print(check_archives(args.manual_dir))
        else:
            print(build(args.manual_dir, args.data_dir))
    except BinaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
