"""Error replies from a site: a catalogue code and its fixed public text, details in the site's log.

Kept free of torch and MONAI so that the light protocol stages of secure aggregation start fast
(every message starts a fresh ClientApp process on a SuperNode).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import PurePath

from flwr.app import Error, Message

from fedhealth.errors import (
    SITE_ERROR_CODES,
    DPRequired,
    FedHealthError,
    PolicyRefused,
    site_error_code,
)
from fedhealth.protocol.keys import NODE_PARTITION_ID, NODE_SITE_NAME

POLICY_FIELD_TAG = "policy: "
"""Marks the refused policy field at the end of a policy refusal's reason (``[policy: field]``)."""

log = logging.getLogger("fedhealth.site")


def error_reply(msg: Message, exc: Exception, phase: str, name: str) -> Message:
    """Log ``exc`` in full at the site and reply with its catalogue code and public text only.

    Parameters
    ----------
    msg : Message
        The instruction that failed.
    exc : Exception
        What went wrong (its text stays in the site's log).
    phase : str
        ``train``, ``evaluate`` or a secure-aggregation stage, for the log.
    name : str
        The site's name; the reply's reason starts ``site <name>: ``.

    Returns
    -------
    Message
        An error reply to ``msg``: code from :func:`fedhealth.errors.site_error_code`, reason
        the code's fixed text from :data:`fedhealth.errors.SITE_ERROR_CODES`; a policy refusal
        ends with ``[policy: <field>]``, the refused field (not the site's limit).
    """
    code = site_error_code(exc)
    if isinstance(exc, FedHealthError):  # catalogued: its message says what and where
        log.error("%s failed (error %d): %s", phase, code, exc)
    else:  # a bug or a library's failure: the stack frame stays in the site's log
        log.exception("%s failed (error %d): %s", phase, code, exc)
    reason = f"site {name}: {SITE_ERROR_CODES[code]}"
    if isinstance(exc, PolicyRefused):  # the policy field, never the site's limit or data
        reason += f" [{POLICY_FIELD_TAG}{exc.field}]"
    elif isinstance(exc, DPRequired):
        reason += f" [{POLICY_FIELD_TAG}require_dp]"
    return Message(Error(code=code, reason=reason), reply_to=msg)


def node_site_name(node: Mapping[str, object], site_dirs: Sequence[str] | None = None) -> str:
    """Name the site from its node config, for error replies sent before its policy is read.

    Parameters
    ----------
    node : mapping
        The SuperNode's node config.
    site_dirs : sequence of str, optional
        Simulation only: every virtual site's folder, by partition id (default None).

    Returns
    -------
    str
        ``site-name``; in simulation the partition's folder name (as the site names itself),
        or ``site-<partition-id>`` without ``site_dirs``; else ``"unknown"``.
    """
    if NODE_SITE_NAME in node:
        return str(node[NODE_SITE_NAME])
    if NODE_PARTITION_ID in node:
        index = node[NODE_PARTITION_ID]
        if site_dirs is not None and isinstance(index, int) and 0 <= index < len(site_dirs):
            return PurePath(site_dirs[index]).name
        return f"site-{index}"
    return "unknown"
