"""The site's egress log: a Flower client mod that records what leaves the site.

Each reply the ClientApp sends is logged as one JSON line (when, which run, message type, byte
count, sha256) so a hospital can audit what crossed its boundary; with ``raw=True`` the payload
bytes themselves are kept too (tests use this to prove that no image byte ever leaves a site).

The file is an audit record and is never rotated or truncated here: each ClientApp process
appends to it (one line per reply, a few hundred bytes per round, fsynced), and rotating a file
that several processes append to, without a lock between them, could lose a line. Archive it
with the hospital's own tools (e.g. logrotate with ``copytruncate``) if it must be bounded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedhealth.io import append_line
from fedhealth.protocol import keys as K


def payload_bytes(msg: Message) -> bytes:
    """Return every value a message carries, as bytes, in a stable order.

    Parameters
    ----------
    msg : Message
        A reply the site is about to send.

    Returns
    -------
    bytes
        The error's reason for an error reply; otherwise each record's name, key and value
        (array bytes, or the value's text), records sorted by name, joined by NUL bytes.
    """
    if msg.has_error():
        return (msg.error.reason or "").encode()
    return _record_bytes(msg.content)


def _record_bytes(content: RecordDict) -> bytes:
    parts: list[bytes] = []
    for name, arrays in sorted(content.array_records.items()):
        for key, array in sorted(arrays.items()):
            parts += [name.encode(), key.encode(), array.data]
    records: dict[str, ConfigRecord | MetricRecord] = {
        **content.config_records,
        **content.metric_records,
    }
    for name, record in sorted(records.items()):
        for key, value in sorted(record.items()):
            values = value if isinstance(value, list) else [value]
            parts += [name.encode(), key.encode()]
            parts += [v if isinstance(v, bytes) else str(v).encode() for v in values]
    return b"\x00".join(parts)


class EgressLog:
    """Record every reply the site sends: a Flower client mod.

    Use as ``ClientApp(mods=[EgressLog(path)])``. Each reply becomes one JSON line: ``time``
    (UTC, ISO 8601, milliseconds), ``run_id`` (Flower's run id), ``run`` (the fedhealth run
    name, from the instruction's run key or the run config; None when neither names it),
    message ``type``, ``round``, ``bytes`` (of :func:`payload_bytes`), its ``sha256``, and
    whether it is an ``error``.

    Parameters
    ----------
    path : Path or str, optional
        The JSON-lines file (default None: the SuperNode's node config key ``egress-log``
        names it, and without that key nothing is logged).
    raw : bool, optional
        Keyword-only. Also append the payload bytes themselves to ``<path>.bin`` (default
        False; tests use it to prove that no image byte ever leaves a site).
    """

    def __init__(self, path: Path | str | None = None, *, raw: bool = False) -> None:
        self.path, self.raw = (Path(path) if path else None), raw

    def __call__(
        self, msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        """Pass ``msg`` on, then record the reply on its way out.

        Parameters
        ----------
        msg : Message
            The instruction.
        context : Context
            Flower's context (its node config may name the log file).
        call_next : callable
            The rest of the ClientApp: ``call_next(msg, context)`` returns the reply.

        Returns
        -------
        Message
            The reply, unchanged.
        """
        reply = call_next(msg, context)
        node = context.node_config
        path = self.path or (
            Path(str(node[K.NODE_EGRESS_LOG])) if K.NODE_EGRESS_LOG in node else None
        )
        if path is None:
            return reply
        data = payload_bytes(reply)
        config = msg.content.config_records.get(K.CONFIG)
        path.parent.mkdir(parents=True, exist_ok=True)
        append_line(
            path,
            json.dumps(
                {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "run_id": msg.metadata.run_id,
                    "run": run_name(msg, context),
                    "type": msg.metadata.message_type,
                    "bytes": len(data),
                    "round": None if config is None else config.get(K.SERVER_ROUND),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "error": reply.has_error(),
                }
            ),
        )
        if self.raw:
            with open(path.with_suffix(".bin"), "ab") as handle:
                handle.write(data)
        return reply


def run_name(msg: Message, context: Context) -> str | None:
    """Name the fedhealth run an instruction belongs to.

    Parameters
    ----------
    msg : Message
        The instruction.
    context : Context
        Flower's context of the run.

    Returns
    -------
    str or None
        The run name: from the instruction's run key (``<run_name>@<config hash>``), else the
        ``run_name`` of the run config (``fedhealth-config``); None when neither names it.
    """
    config = msg.content.config_records.get(K.CONFIG)
    key = None if config is None else config.get(K.RUN_KEY)
    if isinstance(key, str) and key:
        return key.partition("@")[0]
    try:
        name = json.loads(str(context.run_config.get(K.RUN_CONFIG, ""))).get("run_name")
    except (ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None
