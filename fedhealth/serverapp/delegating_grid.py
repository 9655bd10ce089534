"""A ``Grid`` that passes every call to the ``Grid`` it wraps, for wrappers to build on.

Flower's ``Grid`` is abstract; :class:`DelegatingGrid` implements each of its methods by calling
the wrapped grid, so a wrapper (:class:`~fedhealth.serverapp.polling.PolledGrid`,
:class:`~fedhealth.serverapp.secure_grid.SecureGrid`) is a real ``Grid`` that overrides only what
it changes, and the type checker sees every call it passes on.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class DelegatingGrid(Grid):
    """A ``Grid`` that passes every call to the grid it wraps; subclasses override some.

    Parameters
    ----------
    grid : Grid
        The wrapped grid (the ServerApp's, or another wrapper).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        """Set the run of the wrapped grid."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run information."""
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Create a message with the wrapped grid (it sets run and source node ids)."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids of the wrapped grid's connected nodes."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Return the wrapped grid's nodes (a grid may know more than their ids)."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages through the wrapped grid; return their message ids."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to ``message_ids`` that have arrived at the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and collect replies with the wrapped grid's own loop."""
        return self.grid.send_and_receive(messages, timeout=timeout)
