"""Site enrolment through the Control API: register, unregister and list the sites' keys.

A site joins only with a key registered here (SuperNode authentication). Registration goes
through the Control API on the coordinator host (loopback), never through the port the sites
use, and names the node after its enrolled site (``flwr supernode register --name``), so the
SuperLink itself knows every node's site name and the ServerApp reads it from there
(:mod:`fedhealth.serverapp.enrolled`). ``<state_dir>/sites.json`` (owner-only) keeps the node id
of each registration, which ``flwr supernode list`` does not show by name or key, and the
revocations still to be sent to a SuperLink that was down.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedhealth.errors import FederationError
from fedhealth.io import atomic_write_text
from fedhealth.superlink.control import CONNECTION, flwr_cli
from fedhealth.superlink.settings import CoordinatorSettings
from fedhealth.superlink.sitekeys import EnrolledSite, enrolled_sites

log = logging.getLogger("fedhealth.coordinator")

Registry = dict[str, Any]
"""``sites.json``: ``{"nodes": {name: {"node_id", "fingerprint"}}, "revoked": [...]}``."""


def enrolled_keys(s: CoordinatorSettings) -> list[Path]:
    """List the site public keys under ``<enrolled>/sites/*/auth.pub``.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.

    Returns
    -------
    list of Path
        Sorted; empty without an enrolment directory.
    """
    return sorted(Path(s.enrolled).glob("sites/*/auth.pub")) if s.enrolled else []


@contextmanager
def registry(s: CoordinatorSettings) -> Iterator[Registry]:
    """Open ``<state_dir>/sites.json`` for a read-modify-write under an exclusive lock.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (``state_dir``).

    Yields
    ------
    dict
        The registry; written back (atomically, mode 0600) when the block ends without error.

    Raises
    ------
    FederationError
        The file exists but is not a JSON object.
    """
    s.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = s.state / "sites.json"
    with open(s.state / "sites.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            reg = json.loads(path.read_text()) if path.exists() else {}
        except json.JSONDecodeError as exc:
            raise FederationError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(reg, dict):
            raise FederationError(f"{path}: expected a JSON object")
        reg.setdefault("nodes", {})
        reg.setdefault("revoked", [])
        yield reg
        atomic_write_text(path, json.dumps(reg, indent=2, sort_keys=True) + "\n")


def register(s: CoordinatorSettings, env: dict[str, str], site: EnrolledSite) -> int | None:
    """Register one site's key on the running SuperLink, under the site's name.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.
    env : dict of str to str
        The environment holding the ``flwr`` connection to the Control API.
    site : EnrolledSite
        The enrolled site.

    Returns
    -------
    int or None
        The new node id (recorded in ``sites.json``); None when the SuperLink already has this
        key (registered by an earlier start, kept in its database).

    Raises
    ------
    FederationError
        Registration failed, naming the site and its key file.
    """
    try:
        answer = flwr_cli(
            env, ["supernode", "register", str(site.path), CONNECTION, "--name", site.name]
        )
    except FederationError as exc:
        if "already in use" in str(exc):
            return None
        raise FederationError(f"registering site {site.name} ({site.path}): {exc}") from exc
    node_id = int(answer["node-id"])
    with registry(s) as reg:
        reg["nodes"][site.name] = {"node_id": node_id, "fingerprint": site.fingerprint}
    log.info(
        "registered site %s as node %d (%s)",
        site.name,
        node_id,
        site.fingerprint,
        extra={"fields": {"event": "site.enrolled", "site": site.name, "node_id": node_id}},
    )
    return node_id


def unregister(env: dict[str, str], node_id: int) -> bool:
    """Unregister a node on the running SuperLink (``flwr supernode unregister``).

    Parameters
    ----------
    env : dict of str to str
        The environment holding the ``flwr`` connection to the Control API.
    node_id : int
        The node.

    Returns
    -------
    bool
        True when unregistered now; False when the SuperLink does not know it (or already
        unregistered it).

    Raises
    ------
    FederationError
        The Control API did not answer, or refused for another reason.
    """
    try:
        flwr_cli(env, ["supernode", "unregister", str(node_id), CONNECTION])
    except FederationError as exc:
        if "not found" in str(exc).lower() or "already deleted" in str(exc).lower():
            return False
        raise
    return True


def list_nodes(env: dict[str, str]) -> dict[int, dict[str, Any]]:
    """Return the SuperLink's nodes (``flwr supernode list --format json``) by node id.

    Flower 1.39 answers, per node: ``node-id`` (a string), ``owner-name``, ``status``
    (``registered``, ``online``, ``offline``, ``unregistered``), ``created-at``,
    ``online-at``, ``online-elapsed``, ``offline-at``, ``deleted-at``; neither the node's
    name nor its key, hence the node ids in ``sites.json``.

    Parameters
    ----------
    env : dict of str to str
        The environment holding the ``flwr`` connection to the Control API.

    Returns
    -------
    dict of int to dict
        Flower's JSON object of each node.

    Raises
    ------
    FederationError
        The Control API did not answer.
    """
    nodes = flwr_cli(env, ["supernode", "list", CONNECTION, "--verbose"]).get("nodes", [])
    return {int(node["node-id"]): node for node in nodes}


def enrol_sites(s: CoordinatorSettings, env: dict[str, str]) -> list[str]:
    """Send pending revocations, then register every enrolled key the SuperLink lacks.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (nothing is registered in insecure mode).
    env : dict of str to str
        The environment holding the ``flwr`` connection to the Control API.

    Returns
    -------
    list of str
        The names of the sites registered now (a site registered by an earlier start, kept
        in the SuperLink's database, is skipped).

    Raises
    ------
    FederationError
        Registering or unregistering failed, naming the site and its key file.
    EnrolmentError
        A file under ``<enrolled>/sites`` is not a valid public key.
    """
    if s.insecure or not s.enrolled:
        return []
    with registry(s) as reg:
        pending = [r for r in reg["revoked"] if not r.get("unregistered") and r.get("node_id")]
    for record in pending:
        unregister(env, int(record["node_id"]))
        with registry(s) as reg:
            for r in reg["revoked"]:
                if r.get("node_id") == record["node_id"]:
                    r["unregistered"] = True
        log.info("unregistered revoked site %s (node %s)", record["name"], record["node_id"])
    sites = enrolled_sites(Path(s.enrolled))
    if not sites:
        log.warning("no site public keys under %s/sites/*/auth.pub: no site can join", s.enrolled)
    return [site.name for site in sites if register(s, env, site) is not None]
