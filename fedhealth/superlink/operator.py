"""The operator's site enrolment on the coordinator host: ``fedhealth server enrol|sites|revoke``.

Enrolment is the operator's act: a hospital makes its own key pair and sends only the public
key; the operator binds it to the site's name here. When the coordinator service is running
the key is registered (or unregistered) at once through the loopback Control API; otherwise
``fedhealth server run`` does it at its next start.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError, EnrolmentError
from fedhealth.service.process import flower_env
from fedhealth.superlink.control import write_connection
from fedhealth.superlink.enrolment import list_nodes, register, registry, unregister
from fedhealth.superlink.settings import CoordinatorSettings
from fedhealth.superlink.sitekeys import archive, bind, check_name, enrolled_sites


def _enrolled(s: CoordinatorSettings) -> Path:
    if s.insecure or not s.enrolled:
        raise ConfigError(
            "coordinator config: enrolled is not set (or --insecure): site enrolment needs the "
            "enrolment directory of `fedhealth server run`"
        )
    return Path(s.enrolled)


def running(s: CoordinatorSettings) -> bool:
    """Tell whether the coordinator's Control API accepts connections now.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (``control_host``, ``control_port``).

    Returns
    -------
    bool
        True when ``control_host:control_port`` accepts a TCP connection within 1 s.
    """
    with socket.socket(socket.AF_INET6 if ":" in s.control_host else socket.AF_INET) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((s.control_host.strip("[]"), s.control_port)) == 0


def control_env(s: CoordinatorSettings) -> dict[str, str]:
    """Return the environment of ``flwr`` calls to this coordinator's Control API.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.

    Returns
    -------
    dict of str to str
        With ``FLWR_HOME=<state_dir>/flwr``; its connection is written if missing.
    """
    home = s.state / "flwr"
    if not (home / "config.toml").is_file():
        write_connection(s, home)
    return flower_env(home)


def enrol(s: CoordinatorSettings, name: str, key_file: Path) -> list[str]:
    """Enrol ``key_file`` as site ``name`` and register it if the coordinator is running.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings (``enrolled``, ``state_dir``, the Control API).
    name : str
        The site's name, under which its metrics and privacy records are filed.
    key_file : Path
        The public key (``auth.pub``) the site sent.

    Returns
    -------
    list of str
        What was done, one line each, for the operator.

    Raises
    ------
    EnrolmentError
        Not a valid public key (a private key is refused), or the name or key is bound
        elsewhere.
    FederationError
        The running coordinator refused the registration.
    """
    site, new = bind(_enrolled(s), name, key_file)
    lines = [
        f"site {site.name}: {'enrolled' if new else 'already enrolled with this key'} "
        f"({site.fingerprint}, {site.path})"
    ]
    if not running(s):
        return [*lines, "coordinator not running: `fedhealth server run` registers it at start"]
    node_id = register(s, control_env(s), site)
    return [
        *lines,
        f"registered as node {node_id}"
        if node_id is not None
        else "the SuperLink already had this key registered",
    ]


def revoke(s: CoordinatorSettings, name: str) -> list[str]:
    """Revoke site ``name``: unregister its node and archive its key.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.
    name : str
        An enrolled site.

    Returns
    -------
    list of str
        What was done, one line each.

    Raises
    ------
    EnrolmentError
        No such site is enrolled.
    FederationError
        The running coordinator could not unregister the node (the key stays enrolled).
    """
    enrolled = _enrolled(s)
    if not (enrolled / "sites" / check_name(name) / "auth.pub").is_file():
        raise EnrolmentError(f"site {name}: not enrolled under {enrolled / 'sites'}")
    with registry(s) as reg:
        record = reg["nodes"].get(name, {})
    node_id = record.get("node_id")
    is_running = running(s)
    done = is_running and node_id is not None and unregister(control_env(s), int(node_id))
    target = archive(enrolled, name)
    with registry(s) as reg:
        reg["nodes"].pop(name, None)
        reg["revoked"].append(
            {**record, "name": name, "archived": str(target), "unregistered": bool(done)}
        )
    lines = [f"site {name}: key archived to {target}"]
    if done:
        return [*lines, f"node {node_id} unregistered: its connection is refused from now on"]
    if node_id is None:
        return [*lines, "no node id recorded for it: check `flwr supernode list`"]
    if is_running:
        return [*lines, f"node {node_id} was not registered on the SuperLink"]
    return [*lines, f"coordinator not running: node {node_id} is unregistered at its next start"]


def sites(s: CoordinatorSettings) -> list[dict[str, Any]]:
    """List the enrolled sites with their key fingerprint and Flower node id and status.

    Parameters
    ----------
    s : CoordinatorSettings
        The coordinator's settings.

    Returns
    -------
    list of dict
        Per site: ``name``, ``fingerprint``, ``key`` (path), ``node_id`` (or None) and
        ``status`` (Flower's: ``registered``, ``online``, ``offline``; ``not running`` when
        the coordinator is down, ``not registered`` when the SuperLink lacks the node).
    """
    with registry(s) as reg:
        nodes = dict(reg["nodes"])
    flower = list_nodes(control_env(s)) if running(s) else None
    rows = []
    for site in enrolled_sites(_enrolled(s)):
        node_id = nodes.get(site.name, {}).get("node_id")
        if flower is None:
            status = "not running"
        elif node_id is None or node_id not in flower:
            status = "not registered"
        else:
            status = str(flower[node_id].get("status"))
        rows.append(
            {
                "name": site.name,
                "fingerprint": site.fingerprint,
                "key": str(site.path),
                "node_id": node_id,
                "status": status,
            }
        )
    return rows


def command(cmd: str, s: CoordinatorSettings, *, name: str = "", key: Path | None = None) -> int:
    """Run ``fedhealth server enrol|sites|revoke`` and print what was done.

    Parameters
    ----------
    cmd : {"enrol", "sites", "revoke", "sites-json"}
        The subcommand (``sites-json``: the site list as JSON).
    s : CoordinatorSettings
        The coordinator's settings.
    name : str, optional
        The site (enrol, revoke).
    key : Path, optional
        The site's public key file (enrol).

    Returns
    -------
    int
        0.
    """
    if cmd in ("sites", "sites-json"):
        rows = sites(s)
        if cmd == "sites-json":
            print(json.dumps(rows, indent=2))
        for row in rows if cmd == "sites" else []:
            print(f"{row['name']:<20} {row['fingerprint']}  node {row['node_id']}  {row['status']}")
        if not rows and cmd == "sites":
            print(f"no site enrolled under {s.enrolled}/sites")
        return 0
    lines = enrol(s, name, key or Path()) if cmd == "enrol" else revoke(s, name)
    print("\n".join(lines))
    return 0
