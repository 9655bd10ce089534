"""File each reply under the enrolled name of the node that sent it, not the name it claims.

In deployment the operator registers every site key under the site's name
(``fedhealth server enrol`` -> ``flwr supernode register --name``); the SuperLink keeps that
name with the node and the ServerApp's grid returns it (``Grid.get_nodes()``, Flower's
``NodeInfo.name``). :class:`EnrolledGrid` rewrites the name in every reply to the enrolled one,
so metrics, rejections and privacy tables cannot be filed under another site's name, and turns a
reply from a node without an enrolled name into an error reply
(:data:`~fedhealth.errors.ErrorCode.SITE_NOT_ENROLLED`). Simulation has no enrolment and does
not use it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message
from flwr.app.message import make_message
from flwr.serverapp import Grid

from fedhealth.errors import SiteNotEnrolled
from fedhealth.protocol import keys as K
from fedhealth.serverapp.delegating_grid import DelegatingGrid

log = logging.getLogger("fedhealth.coordinator")

ENV_SITE_NAMES = "FEDHEALTH_SITE_NAMES"
"""Set to ``enrolled`` by ``fedhealth server run`` (unless insecure) in the SuperLink's
environment, which its ServerApps inherit: every reply needs an enrolled node."""
_ERROR_SITE = re.compile(r"^site [A-Za-z0-9_.-]{1,64}: ")


class EnrolledGrid(DelegatingGrid):
    """A grid whose replies carry their node's enrolled site name.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (its ``get_nodes()`` carries the names the operator registered).
    required : bool or None, default None
        True: a reply from a node without an enrolled name is refused. None: as
        :data:`ENV_SITE_NAMES` says, or True as soon as any node has an enrolled name (a
        SuperLink without names is an insecure lab: self-declared names are kept).

    Attributes
    ----------
    names : dict of int to str
        Node id -> enrolled name, as last read from the grid.
    """

    def __init__(self, grid: Grid, *, required: bool | None = None) -> None:
        super().__init__(grid)
        self.required = required
        self.names: dict[int, str] = {}

    def refresh(self) -> dict[int, str]:
        """Read node id -> enrolled name from the grid again.

        Returns
        -------
        dict of int to str
            The nodes the SuperLink knows by a name (:attr:`names`).
        """
        self.names = {n.node_id: n.name for n in self.grid.get_nodes() if n.name}
        return self.names

    def binding(self) -> bool:
        """Tell whether replies must come from nodes with an enrolled name.

        Returns
        -------
        bool
            ``required`` when set; otherwise True when :data:`ENV_SITE_NAMES` is ``enrolled``
            or any node has an enrolled name.
        """
        if self.required is not None:
            return self.required
        return os.environ.get(ENV_SITE_NAMES) == "enrolled" or bool(self.names)

    def bind(self, msg: Message) -> Message:
        """Return ``msg`` under its node's enrolled name, or refused when it has none.

        Parameters
        ----------
        msg : Message
            A reply from a site.

        Returns
        -------
        Message
            The same message, its :data:`~fedhealth.protocol.keys.SITE_NAME` (and the
            ``site <name>:`` prefix of an error's reason) set to the enrolled name; an error
            reply with :class:`~fedhealth.errors.SiteNotEnrolled`'s code when the node has no
            enrolled name and names are binding; unchanged otherwise.
        """
        node = msg.metadata.src_node_id
        if node not in self.names:
            self.refresh()
        name = self.names.get(node)
        if name is None:
            if not self.binding():
                return msg
            refused = SiteNotEnrolled(f"node {node}: not an enrolled site; reply refused")
            log.warning("%s", refused, extra={"fields": {"event": "reply.unenrolled"}})
            return make_message(
                msg.metadata, error=Error(int(refused.code), f"node-{node}: {refused}")
            )
        if msg.has_error():
            reason = _ERROR_SITE.sub("", msg.error.reason or "", count=1)
            return make_message(msg.metadata, error=Error(msg.error.code, f"site {name}: {reason}"))
        record = msg.content.config_records.get(K.SITE)
        claimed = record.get(K.SITE_NAME) if record is not None else None
        if claimed != name:
            if claimed is not None:
                log.warning(
                    "node %d (enrolled as %s) calls itself %r: filed as %s",
                    node,
                    name,
                    str(claimed)[:80],
                    name,
                    extra={"fields": {"event": "reply.misnamed", "site": name}},
                )
            if record is not None:
                record[K.SITE_NAME] = name
            elif msg.content.metric_records:  # a train or evaluate reply without its name
                msg.content[K.SITE] = ConfigRecord({K.SITE_NAME: name})
        return msg

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies from the wrapped grid, each under its node's enrolled name."""
        return [self.bind(msg) for msg in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send and collect with the wrapped grid's loop; each reply under its enrolled name."""
        return [self.bind(msg) for msg in self.grid.send_and_receive(messages, timeout=timeout)]
