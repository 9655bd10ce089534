"""Site enrolment: register every site public key the operator placed under ``enrolled/sites/``.

A site joins only with a key registered here (SuperNode authentication); registration goes
through the Control API on the coordinator host, never through the port the sites use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedhealth.errors import FederationError
from fedhealth.superlink.control import CONNECTION, flwr_cli
from fedhealth.superlink.settings import CoordinatorSettings

log = logging.getLogger("fedhealth.coordinator")


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


def enrol_sites(s: CoordinatorSettings, env: dict[str, str]) -> list[str]:
    """Register every enrolled site key the SuperLink does not know yet.

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
        Registering a key failed, naming the site and its key file.
    """
    if s.insecure or not s.enrolled:
        return []
    keys = enrolled_keys(s)
    if not keys:
        log.warning("no site public keys under %s/sites/*/auth.pub: no site can join", s.enrolled)
    added = []
    for pub in keys:
        name = pub.parent.name
        try:
            flwr_cli(env, ["supernode", "register", str(pub), CONNECTION, "--name", name])
        except FederationError as exc:
            if "already in use" in str(exc):  # enrolled by an earlier start (state db)
                continue
            raise FederationError(f"enrolling site {name} ({pub}): {exc}") from exc
        added.append(name)
        log.info(
            "enrolled site %s (%s)",
            name,
            pub,
            extra={"fields": {"event": "site.enrolled", "site": name}},
        )
    return added
