"""The global model on the wire as one array instead of one array per tensor.

Flower sends every ``Array`` of an ``ArrayRecord`` (and every 5 MB chunk of it) as its own
request between SuperNode and SuperLink, two at a time. A MONAI U-Net has one tensor per weight
and bias (32 for the default), so even a small model costs dozens of requests each way per site
and round (``benchmarks/round_overhead.py``: 9 s per round of 4 sites on 2 cores). Packed, the
model is a single float32 vector in state-dict order; both ends build the same network from the
run's config, so the layout never travels, and a vector of the wrong length is refused before
anything is loaded.

The strategies are unaffected (FedAvg, FedProx and FedAdam work element by element), as is
secure aggregation (it flattens whatever record it is given). Checkpoints stay per tensor: the
coordinator unpacks before it writes one. ``federation.pack_arrays=false`` sends stock
per-tensor records.

**16-bit transport** (``federation.transport_dtype``): the packed vector may travel as float16
or bfloat16 (bfloat16 as its raw uint16 bits: numpy has no bfloat16), half the bytes at every
hop. Only the wire is 16-bit: both ends widen to float32 at once (exactly: every 16-bit value is
a float32), the coordinator aggregates, steps its optimiser and checkpoints in float32, and a
site trains in float32 and rounds its update only when it packs it, after Opacus added its
noise (rounding is post-processing: the DP guarantee is unchanged). Under secure aggregation a
site's update is never rounded to 16 bits: it is quantised to the secure sum's own fixed-point
field from float32. The key names the wire dtype (``packed:float16``), so a record can never
be read in the wrong one.

:func:`fedhealth.protocol.npy.array_view` reads a Flower ``Array``'s ``.npy`` bytes without
copying them (Flower's ``Array.numpy`` copies through ``np.load``, 0.26 s per 120 MB here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from flwr.app import Array, ArrayRecord

from fedhealth.errors import ConfigError
from fedhealth.protocol.npy import array_view

if TYPE_CHECKING:
    import torch

TRANSPORT_DTYPES: Final = ("float32", "float16", "bfloat16")
"""What the packed vector may travel as (``federation.transport_dtype``)."""
# Stored dtype per wire dtype: bfloat16 travels as its raw bits.
_STORED: Final = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def packed_key(dtype: str = "float32") -> str:
    """Return the record key of a vector packed in ``dtype`` (one of :data:`TRANSPORT_DTYPES`).

    Not a valid ``torch.nn.Module.state_dict()`` key (those are dotted Python identifiers), so
    a per-tensor record can never be mistaken for a packed one.
    """
    return f"packed:{dtype}"


PACKED_KEY: Final = packed_key("float32")
_KEYS: Final = {packed_key(d): d for d in TRANSPORT_DTYPES}


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return array_view(value)
    if hasattr(value, "detach"):  # torch.Tensor
        return np.asarray(value.detach().cpu().numpy())
    return np.asarray(value)


def layout(state: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Return the keys and shapes, in order, of a float32 state dict (what :func:`unpack` needs).

    Parameters
    ----------
    state : Mapping[str, Any]
        Name -> tensor (``torch.Tensor``, ``np.ndarray`` or Flower ``Array``), all float32.

    Returns
    -------
    list[tuple[str, tuple[int, ...]]]
        (name, shape) per tensor, in ``state``'s order.

    Raises
    ------
    ConfigError
        A tensor is not float32 (naming it).
    """
    out = []
    for key, value in state.items():
        if hasattr(value, "detach"):  # torch.Tensor, on PyTorch's meta device too: no data read
            dtype, shape = str(value.dtype).removeprefix("torch."), tuple(value.shape)
        else:
            array = _numpy(value)
            dtype, shape = str(array.dtype), tuple(array.shape)
        if dtype != "float32":
            raise ConfigError(
                f"model tensor {key!r} is {dtype}: only float32 models can "
                "be packed (set federation.pack_arrays=false)"
            )
        out.append((key, shape))
    return out


def narrow(vector: np.ndarray, dtype: str) -> np.ndarray:
    """Round a float32 vector to the wire dtype (nearest, ties to even).

    Parameters
    ----------
    vector : np.ndarray
        Float32, shape ``(n,)``.
    dtype : str
        One of :data:`TRANSPORT_DTYPES`.

    Returns
    -------
    np.ndarray
        Shape ``(n,)``: float32 (``vector`` itself), float16, or uint16 bfloat16 bits.

    Raises
    ------
    ConfigError
        ``dtype`` is unknown, or a finite value overflows float16 (max 65504: use bfloat16).
    """
    if dtype not in _STORED:
        raise ConfigError(f"transport dtype {dtype!r}: choose one of {list(TRANSPORT_DTYPES)}")
    if dtype == "float32":
        return vector
    import torch  # numpy has no bfloat16; torch rounds to nearest even, as numpy does

    if dtype == "bfloat16":
        return _tensor(vector).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    out = _tensor(vector).to(torch.float16).numpy()  # 4x numpy's astype on one core
    if not np.isfinite(out).all() and np.isfinite(vector).all():
        raise ConfigError(
            "a model value exceeds float16's range (65504): set "
            "federation.transport_dtype=bfloat16 or float32"
        )
    return out


def widen(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Return the float32 values of a :func:`narrow` vector, exactly.

    Parameters
    ----------
    stored : np.ndarray
        Shape ``(n,)`` in the stored dtype of ``dtype``.
    dtype : str
        One of :data:`TRANSPORT_DTYPES`.

    Returns
    -------
    np.ndarray
        Float32, shape ``(n,)`` (``stored`` itself for float32).
    """
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        import torch

        return _tensor(stored).to(torch.float32).numpy()  # twice numpy's astype on one core
    return stored.astype(np.float32, copy=False)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Wrap ``array`` as a CPU tensor without copying it, read-only or not (only read)."""
    import torch

    with warnings.catch_warnings():  # a read-only view of message bytes: never written here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array)


def pack(state: Mapping[str, Any], dtype: str = "float32") -> ArrayRecord:
    """Pack every tensor of ``state``, in order, into one vector in the wire dtype.

    Parameters
    ----------
    state : Mapping[str, Any]
        Name -> float32 tensor (``torch.Tensor``, ``np.ndarray`` or ``Array``), any shapes.
    dtype : str, default "float32"
        The wire dtype, one of :data:`TRANSPORT_DTYPES`.

    Returns
    -------
    ArrayRecord
        One Array under :func:`packed_key` of ``dtype``, shape ``(total number of values,)``.

    Raises
    ------
    ConfigError
        A tensor is not float32, or ``dtype`` is unknown or too narrow for a value.
    """
    layout(state)  # dtype check, naming the tensor
    vector = (
        np.concatenate([_numpy(v).ravel() for v in state.values()])
        if state
        else np.zeros(0, np.float32)
    )
    stored = narrow(np.ascontiguousarray(vector, dtype=np.float32), dtype)
    return ArrayRecord({packed_key(dtype): Array(stored)})


def is_packed(arrays: ArrayRecord) -> bool:
    """Return whether ``arrays`` is a packed record (exactly one array under a packed key)."""
    return len(arrays) == 1 and next(iter(arrays.keys())) in _KEYS


def packed_dtype(arrays: ArrayRecord) -> str | None:
    """Return the wire dtype of a packed record, or None when it is not packed."""
    return _KEYS[next(iter(arrays.keys()))] if is_packed(arrays) else None


def packed_vector(arrays: ArrayRecord, what: str = "model") -> np.ndarray:
    """Return a packed record's values as one float32 vector (widened from a 16-bit wire).

    Parameters
    ----------
    arrays : ArrayRecord
        A record made by :func:`pack`.
    what : str, default "model"
        What the record is, for the error.

    Returns
    -------
    np.ndarray
        Float32, shape ``(n,)``; read-only (a view of the record's bytes) for float32.

    Raises
    ------
    ConfigError
        The record is not packed, or its array is not 1-D in its key's stored dtype.
    """
    dtype = packed_dtype(arrays)
    if dtype is None:
        raise ConfigError(
            f"{what}: expected one packed array {PACKED_KEY!r}, got keys "
            f"{sorted(arrays.keys())[:5]}"
        )
    stored = array_view(arrays[packed_key(dtype)], what)
    if stored.ndim != 1 or stored.dtype != _STORED[dtype]:
        raise ConfigError(
            f"{what}: packed array of shape {stored.shape} and dtype {stored.dtype}, "
            f"{packed_key(dtype)!r} holds a 1-D {np.dtype(_STORED[dtype])} vector"
        )
    return widen(stored, dtype)


def repack(arrays: ArrayRecord, dtype: str) -> ArrayRecord:
    """Return a packed record in wire dtype ``dtype`` (``arrays`` itself when it already is).

    A record that is not packed is returned unchanged (per-tensor records travel as they are).

    Raises
    ------
    ConfigError
        As :func:`packed_vector` and :func:`narrow`.
    """
    current = packed_dtype(arrays)
    if current is None or current == dtype:
        return arrays
    vector = np.ascontiguousarray(packed_vector(arrays))
    return ArrayRecord({packed_key(dtype): Array(narrow(vector, dtype))})


def unpack(
    arrays: ArrayRecord, shapes: list[tuple[str, tuple[int, ...]]], what: str = "model"
) -> dict[str, np.ndarray]:
    """Unpack a packed record into its float32 tensors, by :func:`layout`.

    Parameters
    ----------
    arrays : ArrayRecord
        A record made by :func:`pack`, any wire dtype.
    shapes : list[tuple[str, tuple[int, ...]]]
        The model's :func:`layout`.
    what : str, default "model"
        What the record is, for the error (e.g. ``"round 3 global model"``).

    Returns
    -------
    dict[str, np.ndarray]
        Name -> float32 array of its shape (views into the vector, read-only for a float32
        wire), in ``shapes``' order.

    Raises
    ------
    ConfigError
        The record is not packed, or its vector is not 1-D of the layout's length.
    """
    vector = packed_vector(arrays, what)
    expected = sum(math.prod(shape) for _, shape in shapes)
    if vector.size != expected:
        raise ConfigError(
            f"{what}: packed array of shape {vector.shape}, the model config needs "
            f"{expected} values"
        )
    out, offset = {}, 0
    for key, shape in shapes:
        size = math.prod(shape)
        out[key] = vector[offset : offset + size].reshape(shape)
        offset += size
    return out


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """Concatenate a record's arrays, in sorted key order, into one float64 vector.

    Parameters
    ----------
    arrays : ArrayRecord
        Any arrays (a packed record is widened from its wire dtype).

    Returns
    -------
    np.ndarray
        Shape ``(total number of values,)``, float64 (what secure aggregation quantises).
    """
    if is_packed(arrays):
        return packed_vector(arrays).astype(np.float64)
    return np.concatenate([_numpy(arrays[k]).astype(np.float64).ravel() for k in sorted(arrays)])


def unflatten(vector: np.ndarray, template: ArrayRecord) -> ArrayRecord:
    """Split a :func:`flatten` vector back into ``template``'s arrays.

    Parameters
    ----------
    vector : np.ndarray
        Shape ``(total number of values of template,)`` (extra values are ignored).
    template : ArrayRecord
        Gives the keys, shapes and dtypes.

    Returns
    -------
    ArrayRecord
        ``template``'s keys in its order, each cast to the template's dtype; for a packed
        template, one float32 packed vector whatever its wire dtype (a secure sum's mean is
        not rounded to 16 bits).
    """
    if is_packed(template):
        size = _numpy(template[next(iter(template.keys()))]).size
        return ArrayRecord({PACKED_KEY: Array(vector[:size].astype(np.float32, copy=False))})
    out, offset = {}, 0
    for key in sorted(template):
        ref = _numpy(template[key])
        out[key] = Array(vector[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype))
        offset += ref.size
    return ArrayRecord({k: out[k] for k in template})
