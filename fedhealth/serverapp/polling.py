"""A Grid that collects replies every ``interval`` seconds instead of Flower's fixed 3 s.

Flower's ``send_and_receive`` sleeps 3 s between reply pulls, so every message phase of a round
(train, evaluate, each secure-aggregation stage) is rounded up to 3 s steps. This wrapper does
the same push-then-pull loop over the Grid's public ``push_messages``/``pull_messages`` with a
short interval (measured with ``benchmarks/round_overhead.py``: 3.7 s less per plain round).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedhealth.errors import ConfigError
from fedhealth.serverapp.delegating_grid import DelegatingGrid


class PolledGrid(DelegatingGrid):
    """A ``Grid`` whose ``send_and_receive`` pulls replies every ``interval`` seconds.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid; every other call passes through to it.
    interval : float, default 0.1
        Seconds between reply pulls (Flower's own loop: 3 s); > 0.

    Raises
    ------
    ConfigError
        ``interval`` is not positive.
    """

    def __init__(self, grid: Grid, *, interval: float = 0.1) -> None:
        if not interval > 0:
            raise ConfigError(f"PolledGrid: interval={interval} s, must be positive")
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` passed.

        Parameters
        ----------
        messages : Iterable[Message]
            Instructions, each to its ``dst_node_id``.
        timeout : float or None, default None
            Seconds to wait for replies; None waits until every reply came.

        Returns
        -------
        list[Message]
            The replies that arrived, in arrival order; only replies to these messages (a late
            reply to an earlier round's message is never pulled).
        """
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies
