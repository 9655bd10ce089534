"""How often a SuperNode tells the SuperLink it is alive (Flower's node heartbeat).

A Flower 1.39 SuperNode declares a heartbeat interval when it activates and with every
heartbeat; the SuperLink takes a node for dead (and fails the messages in flight to it) when no
heartbeat came within ``HEARTBEAT_PATIENCE`` (2) times that interval. The SuperNode sends them
from their own thread, every ``(interval - 5 s) x 0.7-0.9``, over the same gRPC channel as its
pulls and pushes, so a site that is still uploading a large update stays online however long the
upload takes (``tests/e2e/test_slow_uplink.py`` uploads through a throttled link for longer than
the patience window). Flower fixes the interval at 30 s (dead after 60 s) with no option; the
SuperLink accepts any interval in [10, 1800] s. A site may choose another: shorter so that the
consortium notices a dead site sooner, longer on a link that drops out for minutes.

This sets Flower's constant in the two modules that read it in the SuperNode process: the
connection (the interval declared to the SuperLink) and the heartbeat thread (the pause between
heartbeats). Both are checked first; if either no longer holds the constant the SuperNode does
not start (a declared interval that the thread does not keep would get the site dropped).
"""

from __future__ import annotations

import importlib
from typing import Final

from fedhealth.errors import PatchMismatch

NAME: Final = "HEARTBEAT_DEFAULT_INTERVAL"
MODULES: Final = ("flwr.client.grpc_rere_client.connection", "flwr.supercore.heartbeat")
"""Where the SuperNode reads :data:`NAME`: the interval it declares, and its heartbeat thread."""
DEFAULT: Final = 30.0
"""Flower's interval, in seconds."""
LIMITS: Final = (10.0, 1800.0)
"""The SuperLink's accepted range (``HEARTBEAT_MIN_INTERVAL``, ``HEARTBEAT_MAX_INTERVAL``)."""


def set_heartbeat_interval(seconds: float) -> None:
    """Make this process's SuperNode declare and keep a heartbeat interval of ``seconds``.

    Parameters
    ----------
    seconds : float
        Heartbeat interval in seconds, within :data:`LIMITS`. The SuperLink takes the node for
        dead after twice this without a heartbeat.

    Raises
    ------
    ValueError
        ``seconds`` is outside :data:`LIMITS`.
    PatchMismatch
        A module of :data:`MODULES` does not hold Flower's constant :data:`NAME` (another
        Flower release); nothing is changed then.
    """
    low, high = LIMITS
    if not low <= seconds <= high:
        raise ValueError(
            f"heartbeat interval {seconds!r}: need {low:g} <= interval <= {high:g} s "
            "(the SuperLink refuses others)"
        )
    from flwr.common import constant

    modules = [importlib.import_module(name) for name in MODULES]
    for module in modules:
        if getattr(module, NAME, None) != getattr(constant, NAME):
            raise PatchMismatch(f"{module.__name__} does not read flwr.common.constant.{NAME}")
    for module in modules:
        setattr(module, NAME, seconds)
