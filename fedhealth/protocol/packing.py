"""The global model on the wire as one array instead of one array per tensor.

Flower sends every ``Array`` of an ``ArrayRecord`` (and every 5 MB chunk of it) as its own HTTPS
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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedhealth.errors import ConfigError

# Not a valid ``torch.nn.Module.state_dict()`` key (those are dotted Python identifiers), so a
# per-tensor record can never be mistaken for a packed one.
PACKED_KEY = "packed:float32"


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Array):
        return value.numpy()
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
        array = _numpy(value)
        if array.dtype != np.float32:
            raise ConfigError(
                f"model tensor {key!r} is {array.dtype}: only float32 models can "
                "be packed (set federation.pack_arrays=false)"
            )
        out.append((key, tuple(array.shape)))
    return out


def pack(state: Mapping[str, Any]) -> ArrayRecord:
    """Pack every tensor of ``state``, in order, into one float32 vector.

    Parameters
    ----------
    state : Mapping[str, Any]
        Name -> float32 tensor (``torch.Tensor``, ``np.ndarray`` or ``Array``), any shapes.

    Returns
    -------
    ArrayRecord
        One Array under :data:`PACKED_KEY`, shape ``(total number of values,)``, float32.

    Raises
    ------
    ConfigError
        A tensor is not float32.
    """
    layout(state)  # dtype check, naming the tensor
    vector = (
        np.concatenate([_numpy(v).ravel() for v in state.values()])
        if state
        else np.zeros(0, np.float32)
    )
    return ArrayRecord({PACKED_KEY: Array(np.ascontiguousarray(vector, dtype=np.float32))})


def is_packed(arrays: ArrayRecord) -> bool:
    """Return whether ``arrays`` is a packed record (exactly one array, :data:`PACKED_KEY`)."""
    return list(arrays.keys()) == [PACKED_KEY]


def unpack(
    arrays: ArrayRecord, shapes: list[tuple[str, tuple[int, ...]]], what: str = "model"
) -> dict[str, np.ndarray]:
    """Unpack a packed record into its tensors, by :func:`layout`.

    Parameters
    ----------
    arrays : ArrayRecord
        A record made by :func:`pack`.
    shapes : list[tuple[str, tuple[int, ...]]]
        The model's :func:`layout`.
    what : str, default "model"
        What the record is, for the error (e.g. ``"round 3 global model"``).

    Returns
    -------
    dict[str, np.ndarray]
        Name -> float32 array of its shape (views into the vector), in ``shapes``' order.

    Raises
    ------
    ConfigError
        The record is not packed, or its vector is not 1-D float32 of the layout's length.
    """
    if not is_packed(arrays):
        raise ConfigError(
            f"{what}: expected one packed array {PACKED_KEY!r}, got keys "
            f"{sorted(arrays.keys())[:5]}"
        )
    vector = arrays[PACKED_KEY].numpy()
    expected = sum(int(np.prod(shape)) for _, shape in shapes)
    if vector.ndim != 1 or vector.size != expected or vector.dtype != np.float32:
        raise ConfigError(
            f"{what}: packed array of shape {vector.shape} and dtype "
            f"{vector.dtype}, the model config needs {expected} float32 values"
        )
    out, offset = {}, 0
    for key, shape in shapes:
        size = int(np.prod(shape))
        out[key] = vector[offset : offset + size].reshape(shape)
        offset += size
    return out


def flatten(arrays: ArrayRecord) -> np.ndarray:
    """Concatenate a record's arrays, in sorted key order, into one float64 vector.

    Parameters
    ----------
    arrays : ArrayRecord
        Any arrays.

    Returns
    -------
    np.ndarray
        Shape ``(total number of values,)``, float64 (what secure aggregation quantises).
    """
    return np.concatenate([arrays[k].numpy().astype(np.float64).ravel() for k in sorted(arrays)])


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
        ``template``'s keys in its order, each cast to the template's dtype.
    """
    out, offset = {}, 0
    for key in sorted(template):
        ref = template[key].numpy()
        out[key] = Array(vector[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype))
        offset += ref.size
    return ArrayRecord({k: out[k] for k in template})
