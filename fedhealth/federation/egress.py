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
    """Client mod: ``ClientApp(mods=[EgressLog(path)])``."""

    def __init__(self, path: Path | str, raw: bool = False) -> None:
        self.path, self.raw = Path(path), raw

    def __call__(self, msg: Message, context: Context,
                 call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        data = payload_bytes(reply)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_line(self.path, json.dumps({
            "type": msg.metadata.message_type, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "error": reply.has_error()}))
        if self.raw:
            with open(self.path.with_suffix(".bin"), "ab") as handle:
                handle.write(data)
        return reply
