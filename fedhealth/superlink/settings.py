"""The coordinator's ``coordinator.yaml``: settings of the service and of the launcher."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fedhealth.errors import ConfigError
from fedhealth.service.settings import load_settings
from fedhealth.superlink.link import OBJECT_STORES

ROLES = ("run", "launch")


@dataclass
class CoordinatorSettings:
    """The coordinator's ``coordinator.yaml`` (every key can also be given as ``key=value``).

    Parameters
    ----------
    host : str
        Where the Fleet API listens (default ``"0.0.0.0"``): the one port sites reach.
    port : int
        The Fleet API's port (default 9092): gRPC with TLS and SuperNode authentication.
    control_host : str
        Where the Control API (``flwr``, the launcher, enrolment) and the ServerApp's Runtime
        API listen (default ``"127.0.0.1"``). Flower's open-source Control API has no user
        authentication, so only a loopback address is accepted.
    control_port : int
        Their HTTPS port (default 9093).
    ca : str
        The consortium CA certificate (required unless ``insecure``).
    cert : str
        The coordinator's TLS certificate, its SANs the names sites use (required to run).
    key : str
        Its private key (required to run).
    enrolled : str
        Directory with ``sites/<name>/auth.pub`` of every enrolled site (required to run).
    state_dir : str
        SuperLink database, Flower home, status and logs (default ``"coordinator"``).
    backoff_initial : float
        Seconds before the first restart of the SuperLink (default 1.0).
    backoff_max : float
        The longest wait between restarts, in seconds (default 60.0).
    insecure : bool
        Plaintext, any site may join: labs only (default False).
    object_store : str
        Where the SuperLink keeps message objects (models and updates in flight): ``"memory"``
        (default; the link state stays in the SQLite database, :mod:`fedhealth.superlink.link`)
        or ``"database"`` (Flower's own choice with ``--database``: in the SQLite file too,
        5.9-8.4 s more per round for a 30M-parameter model with 4 sites).
    approved_apps : list of str
        sha256 of the app bundles (FABs) whose ServerApp the coordinator runs, as ``fedhealth
        app build`` prints them (default none: the FAB of the installed fedhealth project,
        computed when the service starts; :mod:`fedhealth.superlink.appexec`).
    app_signature : str
        The launcher's ``<fab>.sig`` from ``fedhealth app sign``: sent with each run so that
        sites trusting the publisher run it (default ``""``: unsigned).
    """

    host: str = "0.0.0.0"
    port: int = 9092
    control_host: str = "127.0.0.1"
    control_port: int = 9093
    ca: str = ""
    cert: str = ""
    key: str = ""
    enrolled: str = ""
    state_dir: str = "coordinator"
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    insecure: bool = False
    object_store: str = "memory"
    approved_apps: list[str] = field(default_factory=list)
    app_signature: str = ""

    PATHS: ClassVar[tuple[str, ...]] = (
        "ca",
        "cert",
        "key",
        "enrolled",
        "state_dir",
        "app_signature",
    )

    def validate(self, role: str = "run") -> CoordinatorSettings:
        """Check the settings a role needs.

        Parameters
        ----------
        role : str, optional
            ``"run"`` (default): the service needs the TLS files and the enrolment
            directory; ``"launch"``: the launcher needs only the CA.

        Returns
        -------
        CoordinatorSettings
            ``self``, checked.

        Raises
        ------
        ConfigError
            A needed key is missing, a file is not there, or the port is out of range.
        """
        if role not in ROLES:
            raise ConfigError(f"coordinator config: role {role!r}: one of {ROLES}")
        needed = ("ca", "cert", "key", "enrolled") if role == "run" else ("ca",)
        if not self.insecure:
            missing = [k for k in needed if not getattr(self, k)]
            if missing:
                raise ConfigError(
                    f"coordinator config: {', '.join(missing)} required (TLS and "
                    "site enrolment); plaintext only with --insecure"
                )
            for key in needed[:-1] if role == "run" else needed:
                if not Path(getattr(self, key)).is_file():
                    raise ConfigError(f"coordinator config: {key}={getattr(self, key)}: not found")
        for key in ("port", "control_port"):
            if not 0 < getattr(self, key) < 65536:
                raise ConfigError(f"coordinator config: {key}={getattr(self, key)}: not a port")
        if self.object_store not in OBJECT_STORES:
            raise ConfigError(
                f"coordinator config: object_store={self.object_store}: one of {OBJECT_STORES}"
            )
        if self.port == self.control_port:
            raise ConfigError(
                f"coordinator config: port={self.port} and control_port={self.control_port}: "
                "the Fleet API (sites) and the Control API (operator) need their own ports"
            )
        if not is_loopback(self.control_host):
            raise ConfigError(
                f"coordinator config: control_host={self.control_host}: the Control API has no "
                "user authentication in Flower's open-source SuperLink, so anyone who reaches it "
                "could list, read, stop and start runs; it listens on loopback only "
                "(127.0.0.1 or ::1). Operators reach it on the coordinator host (or from a "
                "container in its network namespace)."
            )
        from fedhealth.security.apps import INSTALLED, check_sha256

        self.approved_apps = [
            h if h == INSTALLED else check_sha256(h, "coordinator config: approved_apps")
            for h in self.approved_apps
        ]
        return self

    @property
    def state(self) -> Path:
        """The state directory (``state_dir``)."""
        return Path(self.state_dir)


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback address (``localhost``, 127.0.0.0/8, ``::1``).

    Parameters
    ----------
    host : str
        A host name or IP address.

    Returns
    -------
    bool
        True for ``localhost`` and loopback IP addresses; False for every other name.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load(
    path: Path | None, overrides: list[str], *, insecure: bool = False, role: str = "run"
) -> CoordinatorSettings:
    """Load ``coordinator.yaml`` and ``key=value`` overrides, and check them for ``role``.

    Parameters
    ----------
    path : Path or None
        The ``coordinator.yaml`` (relative paths in it are relative to its directory); None:
        the overrides only.
    overrides : list of str
        ``key=value`` items, applied after the file.
    insecure : bool, optional
        Force plaintext without site authentication (``--insecure``; default False: as the
        file says).
    role : str, optional
        ``"run"`` (default) or ``"launch"``: what :meth:`CoordinatorSettings.validate` checks.

    Returns
    -------
    CoordinatorSettings
        The checked settings.

    Raises
    ------
    ConfigError
        A file, key or value is missing or wrong; the message names it.
    """
    settings = load_settings(
        CoordinatorSettings, path, overrides, CoordinatorSettings.PATHS, "coordinator"
    )
    settings.insecure = settings.insecure or insecure
    return settings.validate(role)
