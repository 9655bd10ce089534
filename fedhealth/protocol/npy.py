"""Flower ``Array`` values read in place: a ``.npy`` header parsed, the bytes viewed, no copy.

Flower's ``Array.numpy`` goes through ``np.load`` (a copy, 0.26 s per 120 MB on these
machines); :func:`array_view` shares the record's bytes instead and never loads an object
(pickled) array.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedhealth.errors import ConfigError


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Read a ``.npy`` header (v1 or v2) without reading the array.

    Parameters
    ----------
    data : bytes
        A ``.npy`` file's bytes.

    Returns
    -------
    tuple
        (shape, fortran order, dtype, offset of the first value in ``data``).

    Raises
    ------
    ValueError
        Not a ``.npy`` header numpy reads, or another version.
    """
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy version {version} is not read")
    return tuple(shape), bool(fortran), dtype, stream.tell()


def array_view(array: Array, what: str = "array") -> np.ndarray:
    """Return a Flower ``Array``'s values as a read-only view of its ``.npy`` bytes (no copy).

    Parameters
    ----------
    array : Array
        A numpy-serialised Flower ``Array``.
    what : str, default "array"
        What it is, for the error.

    Returns
    -------
    np.ndarray
        Read-only, the header's shape and dtype, sharing ``array.data``'s memory.

    Raises
    ------
    ConfigError
        The bytes are not a ``.npy`` v1/v2 array of a plain dtype, or too short for its header.
    """
    data = array.data
    try:
        shape, fortran, dtype, offset = npy_header(data)
        if dtype.hasobject:
            raise ValueError("object arrays are never loaded")
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    except ValueError as exc:
        raise ConfigError(f"{what}: bytes are not a .npy array ({exc})") from None
    return flat.reshape(shape, order="F" if fortran else "C")


class ViewArray(Array):
    """A Flower ``Array`` whose :meth:`numpy` is :func:`array_view` (no copy through np.load).

    For arrays that never leave this process (e.g. the replies handed to Flower's FedAvg,
    which reads each one with ``numpy()`` and writes a new result): read-only values.
    """

    def numpy(self) -> np.ndarray:
        """Return the values as a read-only view of the ``.npy`` bytes."""
        return array_view(self)


def viewed(arrays: ArrayRecord) -> ArrayRecord:
    """Return ``arrays`` with each Array as a :class:`ViewArray` over the same bytes."""
    return ArrayRecord(
        {
            k: ViewArray(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
            for k, a in arrays.items()
        }
    )
