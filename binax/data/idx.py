"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al., 1998; Xiao et al., 2017).

An IDX file is a big-endian header ``0x00 0x00 <type> <ndim>``, then ``ndim`` uint32
dimension sizes, then the values in C order. The same parser reads gzip-compressed and
raw files; it tells them apart by the gzip magic bytes, not by the file name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
from binax.errors import DataError

# IDX type byte -> big-endian numpy dtype (the format's table).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

# split -> (images file, labels file), the names the MNIST and Fashion-MNIST
# distributions (and Debian's dataset-fashion-mnist) use.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parses the bytes of an (uncompressed) IDX file into an array in native byte order.

    ``source`` only names the data in error messages.
    """
    if len(data) < 4:
        raise DataError(f"{source}: {len(data)} bytes is too short for an IDX header")
    zero0, zero1, type_code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0 or type_code not in _IDX_DTYPES:
        raise DataError(
            f"{source}: bad IDX magic {data[:4].hex()}; expected 0000 followed by a type "
            f"byte in {{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and the number of "
            f"dimensions (e.g. 00000803 for images, 00000801 for labels)"
        )
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise DataError(f"{source}: truncated IDX header ({ndim} dimensions announced)")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_end
    if payload != expected:
        raise DataError(
            f"{source}: IDX header announces shape {shape} of {dtype.name} "
            f"({expected} bytes) but the file holds {payload} bytes of data"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native order


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or raw, into a numpy array.

    Returns ``uint8`` ``(N, rows, cols)`` for an image file and ``uint8`` ``(N,)`` for a
    label file (the types and shapes the header declares). Raises
    :class:`~binax.errors.DataError` (a ``ValueError``) naming the file for a file that is
    not IDX or whose gzip stream is truncated or corrupt.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{os.fspath(path)}: the gzip data is damaged ({e}); the file is truncated or "
                "corrupt. Restore it (Debian: `sudo apt-get install --reinstall dataset-fashion-mnist`)."
            ) from None
    return parse_idx(data, source=os.fspath(path))


def find_idx_file(data_dir: str, stem: str) -> str | None:
    """``data_dir/stem.gz`` or ``data_dir/stem``, whichever exists first; else ``None``."""
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None
