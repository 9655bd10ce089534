"""What a round moves per site, and the round deadline that follows from it.

A site's round is its download of the global model, its training, and its upload; the first
and last grow with the model (a 30M-parameter U-Net is 120 MB in float32) and with how slow the
hospital's link is. ``federation.round_timeout=0`` (the default) derives the deadline from the
model's size instead of one fixed number, so a site still uploading a large update over a slow
link is not dropped as if it were dead:

    deadline = TRAIN_ALLOWANCE_S + SAFETY * 8 * (down + up bytes) / (site_link_mbps * 1e6)

Flower keeps a SuperNode online during a long transfer (its heartbeats run on their own thread
over the same gRPC channel); the deadline is what would cut the site off.
"""

from __future__ import annotations

import math
from typing import Final

import torch

from fedhealth.config_schema import Config, ModelConfig

TRAIN_ALLOWANCE_S: Final = 600.0
"""Seconds a round allows for training and evaluation, besides the transfers."""
SAFETY: Final = 2.0
"""Factor on the transfer time at ``federation.site_link_mbps``."""
NPY_HEADER: Final = 128
"""Bytes of a ``.npy`` header (Flower serialises each array with ``np.save``)."""
_BYTES: Final = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_values(model: ModelConfig) -> int:
    """Count the values of the configured network's state dict, without allocating it.

    Parameters
    ----------
    model : ModelConfig
        The run's ``model`` section.

    Returns
    -------
    int
        Number of values (parameters and buffers) a packed model carries.
    """
    from fedhealth.models import build_model

    with torch.device("meta"):  # shapes only, no memory
        state = build_model(model).state_dict()
    return sum(math.prod(v.shape) for v in state.values())


def wire_bytes(values: int, dtype: str, *, secure: bool) -> tuple[int, int]:
    """Bytes one site receives and sends in one round's train message and reply.

    Parameters
    ----------
    values : int
        Values of the packed model (:func:`model_values`).
    dtype : str
        ``federation.transport_dtype``: float32 (4 bytes a value), float16 or bfloat16 (2).
    secure : bool
        Keyword-only. Secure aggregation: the update travels as the secure sum's uint32
        field elements (4 bytes a value, plus the loss and the example count) whatever
        ``dtype`` is.

    Returns
    -------
    tuple of (int, int)
        (down, up) in bytes: the arrays' payload and ``.npy`` header, not Flower's framing.
    """
    down = values * _BYTES[dtype] + NPY_HEADER
    up = (values + 2) * 4 + NPY_HEADER if secure else down
    return down, up


def round_deadline(cfg: Config, values: int | None = None) -> float:
    """Seconds a round waits for the sites' replies (and for the sites before it starts).

    Parameters
    ----------
    cfg : Config
        The run config: ``federation.round_timeout`` (> 0: used as it is), else
        ``federation.site_link_mbps``, ``transport_dtype``, ``secure_aggregation`` and
        ``model``.
    values : int or None, default None
        Values of the packed model; None counts them (:func:`model_values`).

    Returns
    -------
    float
        ``round_timeout``, or ``TRAIN_ALLOWANCE_S + SAFETY * transfer seconds``.
    """
    fed = cfg.federation
    if fed.round_timeout > 0:
        return float(fed.round_timeout)
    values = model_values(cfg.model) if values is None else values
    down, up = wire_bytes(values, fed.transport_dtype, secure=fed.secure_aggregation)
    transfer = 8 * (down + up) / (fed.site_link_mbps * 1e6)
    return TRAIN_ALLOWANCE_S + SAFETY * transfer
