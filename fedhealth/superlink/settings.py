"""The coordinator's ``coordinator.yaml``: settings of the service and of the launcher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedhealth.errors import ConfigError
from fedhealth.service.settings import load_settings

ROLES = ("run", "launch")


@dataclass
class CoordinatorSettings:
    """The coordinator's ``coordinator.yaml`` (every key can also be given as ``key=value``).

    Parameters
    ----------
    host : str
        Where the SuperLink listens (default ``"0.0.0.0"``).
    port : int
        Its one HTTP(S) port (default 9092): sites (Fleet API), ``flwr`` and the launcher
        (Control API) and the ServerApp (Runtime API).
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
    """

    host: str = "0.0.0.0"
    port: int = 9092
    ca: str = ""
    cert: str = ""
    key: str = ""
    enrolled: str = ""
    state_dir: str = "coordinator"
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    insecure: bool = False

    PATHS: ClassVar[tuple[str, ...]] = ("ca", "cert", "key", "enrolled", "state_dir")

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
        if not 0 < self.port < 65536:
            raise ConfigError(f"coordinator config: port={self.port}: not a port")
        return self

    @property
    def state(self) -> Path:
        """The state directory (``state_dir``)."""
        return Path(self.state_dir)


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
