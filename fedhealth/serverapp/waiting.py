"""Wait for sites before a round, always with a deadline.

Flower's node sampling waits for ``min_available_nodes`` without one; the guarded strategy waits
here first, so a consortium whose sites are gone stops cleanly instead of hanging.
"""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

from fedhealth.errors import RunStopped

log = logging.getLogger("fedhealth.coordinator")


def wait_for_sites(
    grid: Grid,
    server_round: int,
    *,
    min_sites: int,
    timeout: float,
    previous: int = 0,
    rejoin_wait: float = 0.0,
) -> int:
    """Wait until ``min_sites`` sites are connected, then briefly for last round's others.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; its node ids are polled every second (0.5 s while waiting for
        returning sites).
    server_round : int
        The round about to start, for the messages.
    min_sites : int
        Sites that must be connected.
    timeout : float
        Seconds to wait for them.
    previous : int, default 0
        Sites the previous round was sent to; when fewer are connected, wait for the others
        up to ``rejoin_wait`` seconds more, then go on without them.
    rejoin_wait : float, default 0.0
        Seconds to wait for returning sites.

    Returns
    -------
    int
        Sites connected when the wait ended.

    Raises
    ------
    RunStopped
        Fewer than ``min_sites`` sites connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < min_sites:
        if time.monotonic() > deadline:
            raise RunStopped(
                f"round {server_round}: only {connected} of the {min_sites} required "
                f"sites connected within {timeout:.0f}s"
            )
        time.sleep(1.0)
    if connected < previous:  # sites of the last round are gone: a moment to come back
        deadline = time.monotonic() + rejoin_wait
        while connected < previous and time.monotonic() < deadline:
            time.sleep(0.5)
            connected = len(list(grid.get_node_ids()))
        if connected < previous:
            log.info(
                "round %d: %d of the previous round's %d sites connected after %.0fs; "
                "going on without the others",
                server_round,
                connected,
                previous,
                rejoin_wait,
            )
    return connected
