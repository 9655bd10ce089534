"""What the coordinator keeps of a secure sum (``SecureGrid``): its keys, the sites' parsed replies.

Every parser raises ``KeyError``, ``TypeError``, ``ValueError`` or ``IndexError`` on a reply it
cannot read; :class:`~fedhealth.serverapp.secure_grid.SecureGrid` then drops that site.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord
from flwr.app.typing import ConfigRecordValues

from fedhealth.errors import ConfigError
from fedhealth.protocol import keys as K
from fedhealth.protocol.npy import array_view
from fedhealth.security.secagg import SecAggServer
from fedhealth.security.validation import validate_metrics


@dataclass
class Keys:
    """Stages 1-2 of one secure sum: the sites' keys and routed shares.

    Parameters
    ----------
    nodes : tuple of int
        The Flower node ids asked, in a fresh random order per keying; protocol id ``k`` is
        ``nodes[k - 1]`` (so a SecAgg+ graph of fewer neighbours than sites changes each round,
        whatever the node ids).
    server : SecAggServer
        The sum's parameters, graph, public keys and encrypted shares.
    errors : list of Message
        Error replies of these stages (passed on to the strategy with the round's).
    """

    nodes: tuple[int, ...]
    server: SecAggServer
    errors: list[Message] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every site advertised its keys and shared its secrets."""
        return len(self.server.shared) == len(self.nodes)

    @property
    def node_of(self) -> dict[int, int]:
        """Protocol id (1..n) -> Flower node id."""
        return dict(enumerate(self.nodes, start=1))


@dataclass(frozen=True)
class MaskedReply:
    """A site's checked reply to the mask stage.

    Parameters
    ----------
    vector : np.ndarray
        The masked, quantised update, then its training loss, with the example count as its
        last word; shape ``(model size + 2,)``, unsigned or signed integers.
    metrics : MetricRecord
        The site's validated plaintext metrics (what its policy releases: epsilon, the ledger's
        standing; passed on to the strategy, metrics only).
    site : ConfigRecord
        The site's ``site`` record (its name and privacy unit).
    """

    vector: np.ndarray
    metrics: MetricRecord
    site: ConfigRecord


def parse_masked(reply: Message, size: int, max_examples: int, pid: int) -> MaskedReply:
    """Check a mask-stage reply: the vector's length and dtype, the metrics, the site record.

    Parameters
    ----------
    reply : Message
        The site's reply to ``train.secagg_mask``.
    size : int
        The masked vector's expected length: the model's values, the loss and the count.
    max_examples : int
        Public bound on one site's example count (checked on a count the site releases).
    pid : int
        The site's protocol id, named in errors.

    Returns
    -------
    MaskedReply
        The vector (a read-only view of the reply's bytes) and the checked records.

    Raises
    ------
    ValueError
        The vector has another length or a non-integer dtype, or a metric is out of range.
    KeyError
        A record is missing.
    """
    try:
        vector = array_view(reply.content.array_records[K.MASKED][K.MASKED], "masked vector")
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if vector.shape != (size,) or vector.dtype.kind not in "ui":
        raise ValueError(
            f"masked vector {vector.dtype}{vector.shape}, expected "
            f"({size},): the model, the loss and the example count"
        )
    metrics = reply.content.metric_records[K.METRICS]
    # the count and the loss are inside the sum; a count the site releases is still checked
    validate_metrics(dict(metrics.items()), max_examples, f"protocol id {pid}", (), weighted=False)
    return MaskedReply(vector, metrics, reply.content.config_records[K.SITE])


def server_round_of(msg: Message) -> int:
    """Return the server round an instruction names in its ``config`` record (0: none).

    Parameters
    ----------
    msg : Message
        A strategy's instruction.

    Returns
    -------
    int
        Its ``config`` record's server round, or 0 if it names none.
    """
    config = msg.content.config_records.get(K.CONFIG)
    value = None if config is None else config.get(K.SERVER_ROUND)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _bytes(value: ConfigRecordValues) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def _ints(value: ConfigRecordValues) -> list[int]:
    out = [v for v in value if isinstance(v, int)] if isinstance(value, list) else None
    if out is None or not isinstance(value, list) or len(out) != len(value):
        raise TypeError(f"expected a list of int, got {type(value).__name__}")
    return out


def _bytes_list(value: ConfigRecordValues) -> list[bytes]:
    out = [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else None
    if out is None or not isinstance(value, list) or len(out) != len(value):
        raise TypeError(f"expected a list of bytes, got {type(value).__name__}")
    return out


def parse_publics(reply: Message) -> tuple[bytes, bytes]:
    """Read an advertise reply: the site's two public keys (encryption, masking).

    Raises
    ------
    TypeError, KeyError, ValueError
        A key is missing, not bytes, or longer than 1 KiB.
    """
    rec = reply.content.config_records[K.SECAGG]
    keys = (_bytes(rec[K.SECAGG_PUBLIC_C]), _bytes(rec[K.SECAGG_PUBLIC_S]))
    if any(len(k) > 1024 for k in keys):
        raise ValueError("public key too long")
    return keys


def parse_blobs(reply: Message) -> dict[int, bytes]:
    """Read a share reply: recipient protocol id -> the encrypted shares for it.

    Raises
    ------
    TypeError, KeyError, ValueError
        A field is missing or mistyped, or the two lists differ in length.
    """
    return _by_id(reply, K.SECAGG_TO, K.SECAGG_BLOBS)


def parse_reveals(reply: Message) -> dict[int, bytes]:
    """Read an unmask reply: owner protocol id -> the share revealed of its secret.

    Raises
    ------
    TypeError, KeyError, ValueError
        A field is missing or mistyped, or the two lists differ in length.
    """
    return _by_id(reply, K.SECAGG_OWNERS, K.SECAGG_SHARES)


def _by_id(reply: Message, ids: str, blobs: str) -> dict[int, bytes]:
    rec = reply.content.config_records[K.SECAGG]
    return dict(zip(_ints(rec[ids]), _bytes_list(rec[blobs]), strict=True))
