"""The site's egress log: a Flower client mod that records what leaves the site.

Each reply the ClientApp sends is logged as one JSON line (message type, byte count, sha256) so a
hospital can audit what crossed its boundary; with ``raw=True`` the payload bytes themselves are
kept too (tests use this to prove that no image byte ever leaves a site).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message, RecordDict

from fedhealth.io import append_line
from fedhealth.protocol import keys as K


def payload_bytes(msg: Message) -> bytes:
    """Every value a message carries, as bytes, in a stable order."""
    if msg.has_error():
        return msg.error.reason.encode()
    return _record_bytes(msg.content)


def _record_bytes(content: RecordDict) -> bytes:
    parts: list[bytes] = []
    for name, record in sorted(content.array_records.items()):
        for key, array in sorted(record.items()):
            parts += [name.encode(), key.encode(), array.data]
    for name, record in sorted({**content.config_records, **content.metric_records}.items()):
        for key, value in sorted(record.items()):
            values = value if isinstance(value, list) else [value]
            parts += [name.encode(), key.encode()]
            parts += [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return b"\x00".join(parts)


class EgressLog:
    """Client mod: ``ClientApp(mods=[EgressLog(path)])``; with no path, the SuperNode's node
    config key ``egress-log`` names the file (and no key means no log).
    """

    def __init__(self, path: Path | str | None = None, raw: bool = False) -> None:
        self.path, self.raw = (Path(path) if path else None), raw

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        reply = call_next(msg, context)
        node = context.node_config
        path = self.path or (
            Path(str(node[K.NODE_EGRESS_LOG])) if K.NODE_EGRESS_LOG in node else None
        )
        if path is None:
            return reply
        data = payload_bytes(reply)
        path.parent.mkdir(parents=True, exist_ok=True)
        append_line(
            path,
            json.dumps(
                {
                    "type": msg.metadata.message_type,
                    "bytes": len(data),
                    "round": msg.content[K.CONFIG][K.SERVER_ROUND]
                    if K.CONFIG in msg.content.config_records
                    and K.SERVER_ROUND in msg.content[K.CONFIG]
                    else None,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "error": reply.has_error(),
                }
            ),
        )
        if self.raw:
            with open(path.with_suffix(".bin"), "ab") as handle:
                handle.write(data)
        return reply
