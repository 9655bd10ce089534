"""A hospital's ``site.yaml``: the site daemon's settings, checked when loaded."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fedhealth.errors import ConfigError
from fedhealth.privacy.policy import SitePolicy
from fedhealth.protocol.keys import PRIVACY_UNITS
from fedhealth.service.settings import load_settings
from fedhealth.supernode.heartbeat import DEFAULT as HEARTBEAT_DEFAULT
from fedhealth.supernode.heartbeat import LIMITS as HEARTBEAT_LIMITS
from fedhealth.supernode.paced import MAX_INTERVAL

ISOLATION = ("warm", "subprocess")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class SiteSettings:
    """A hospital's ``site.yaml`` (every key can also be given as ``key=value``).

    Parameters
    ----------
    name : str
        The site's name, 1-64 of ``A-Z a-z 0-9 _ . -`` (required).
    coordinator : str
        ``host:port`` of the coordinator's Fleet API (required).
    ca : str
        The consortium's ``ca.crt``, the TLS root (required unless ``insecure``).
    auth_key : str
        The site's private authentication key, mode 0600 (required unless ``insecure``).
    data_dir : str
        The directory holding the site's ``dataset.json`` (required; only ever read).
    ledger_dir : str
        Where the privacy ledger ``ledger.sqlite`` lives (required).
    state_dir : str
        ``status.json``, ``daemon.jsonl`` and Flower's app cache (default ``"state"``).
    log_level : str
        ``"info"`` (default): the daemon's log (``daemon.jsonl`` and stderr) holds state
        changes (connected, run started, round trained or failed, refused, reconnecting, child
        exits, log rotated); ``"debug"`` adds every message and poll its children print;
        ``"warning"``, ``"error"``: less.
    log_max_bytes : int
        ``daemon.jsonl`` is rotated when it reaches this many bytes (default 10_000_000, at
        least 1024); the previous file is ``daemon.jsonl.1``.
    log_backups : int
        Rotated files kept, ``daemon.jsonl.1`` to ``.N`` (default 5, at least 1; the oldest is
        deleted): the log takes at most ``log_max_bytes * (log_backups + 1)`` bytes. The
        egress log and ``apps.jsonl`` are audit records, written by several processes: never
        rotated by the daemon (a few hundred bytes per round or run).
    epsilon_cap : float
        The site's own cap on epsilon (default 8.0).
    delta : float
        The site's delta, in (0, 1) (default 1e-5).
    privacy_unit : str
        What one DP record is: ``"patient"`` (default: every training entry of
        ``dataset.json`` needs a ``patient`` id, and all of a patient's scans count as one
        record) or ``"scan"`` (each scan is one record; the privacy report says "per scan, not
        per patient"). Site-local: the coordinator cannot set it.
    policy : SitePolicy
        The site's privacy policy (:class:`fedhealth.privacy.policy.SitePolicy`): DP and
        secure aggregation required, the fewest sites per secure sum, epsilon and rounds per
        run, the noise ceiling, bounds on what the coordinator may set, and what the site
        releases beyond the minimal reply. Site-local: the coordinator cannot set it. Override
        as ``policy.min_secagg_sites=4``.
    dp_noise_seed : int or None
        Deterministic DP noise from this seed (default None: the OS's entropy). For tests
        that compare runs only: whoever knows it can reproduce the site's noise. Site-local.
    device : str
        Where the site trains and evaluates: ``"auto"`` (default: CUDA when PyTorch sees a
        GPU, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``
        (:func:`fedhealth.training.device.resolve_device`). Site-local: the coordinator cannot
        choose a site's hardware.
    appio_port : int
        The SuperNode's local ClientApp API port (default 9094).
    isolation : str
        ``"warm"`` (default): ClientApps fork from a pre-loaded process
        (:mod:`fedhealth.supernode.warm`); ``"subprocess"``: Flower starts a fresh one per
        message.
    pull_interval : float
        Seconds between the SuperNode's polls, in (0, 3] (default 0.5; Flower: 3 s;
        :mod:`fedhealth.supernode.paced`).
    heartbeat_interval : float
        Seconds between the SuperNode's heartbeats, in [10, 1800] (default 30, Flower's): the
        SuperLink takes the site for dead after twice this without one. Heartbeats go on while
        the site uploads (:mod:`fedhealth.supernode.heartbeat`).
    backoff_initial : float
        Seconds before the first restart of the SuperNode (default 1.0).
    backoff_max : float
        The longest wait between restarts, in seconds (default 60.0).
    stop_grace : float
        On SIGTERM, seconds a running ClientApp may finish (default 30.0).
    egress_log : str
        Optional JSON-lines record of every reply sent (default ``""``: none): UTC time,
        Flower run id, fedhealth run name, message type, round, bytes, sha256.
    insecure : bool
        Plaintext, no authentication: labs only (default False).
    approved_apps : list of str
        sha256 of the app bundles (FABs) the site runs, as ``fedhealth app build`` prints
        them (default none); ``installed``: the FAB of the fedhealth release installed at this
        site, hashed at start. Override as ``approved_apps=[HASH1,HASH2]``.
    trusted_publishers : str
        YAML mapping publisher key ids to ``ssh-ed25519`` public keys (Flower's
        trusted-entities format): FABs they signed run too (default ``""``: none). With
        neither set, the site refuses every app.
    """

    name: str = "???"
    coordinator: str = "???"
    ca: str = ""
    auth_key: str = ""
    data_dir: str = "???"
    ledger_dir: str = "???"
    state_dir: str = "state"
    log_level: str = "info"
    log_max_bytes: int = 10_000_000
    log_backups: int = 5
    epsilon_cap: float = 8.0
    delta: float = 1e-5
    privacy_unit: str = "patient"
    policy: SitePolicy = field(default_factory=SitePolicy)
    dp_noise_seed: int | None = None
    device: str = "auto"
    appio_port: int = 9094
    isolation: str = "warm"
    pull_interval: float = 0.5
    heartbeat_interval: float = HEARTBEAT_DEFAULT
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stop_grace: float = 30.0
    egress_log: str = ""
    insecure: bool = False
    approved_apps: list[str] = field(default_factory=list)
    trusted_publishers: str = ""

    PATHS: ClassVar[tuple[str, ...]] = (
        "trusted_publishers",
        "ca",
        "auth_key",
        "data_dir",
        "ledger_dir",
        "state_dir",
        "egress_log",
    )

    def validate(self) -> SiteSettings:
        """Check the values together.

        Returns
        -------
        SiteSettings
            ``self``, checked.

        Raises
        ------
        ConfigError
            Naming the key and the rule it breaks.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"site config: name={self.name!r}: 1-64 of A-Z a-z 0-9 _ . -")
        if not re.fullmatch(r"[^:\s]+:\d{1,5}", self.coordinator):
            raise ConfigError(f"site config: coordinator={self.coordinator!r}: expected host:port")
        if not self.insecure and (not self.ca or not self.auth_key):
            raise ConfigError(
                "site config: 'ca' and 'auth_key' are required (TLS and site "
                "authentication); plaintext only with --insecure"
            )
        if not 0 < self.epsilon_cap or not 0 < self.delta < 1:
            raise ConfigError(
                f"site config: epsilon_cap={self.epsilon_cap}, delta={self.delta}: "
                "need epsilon_cap > 0 and 0 < delta < 1"
            )
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ConfigError(
                f"site config: privacy_unit={self.privacy_unit!r}: one of {PRIVACY_UNITS}"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"site config: device={self.device!r}: one of auto, cpu, cuda, cuda:N"
            )
        self.policy.validate("site config: policy")
        if self.isolation not in ISOLATION:
            raise ConfigError(f"site config: isolation={self.isolation!r}: one of {ISOLATION}")
        if not 0 < self.pull_interval <= MAX_INTERVAL:
            raise ConfigError(
                f"site config: pull_interval={self.pull_interval!r}: need "
                f"0 < pull_interval <= {MAX_INTERVAL:g} (seconds)"
            )
        low, high = HEARTBEAT_LIMITS
        if not low <= self.heartbeat_interval <= high:
            raise ConfigError(
                f"site config: heartbeat_interval={self.heartbeat_interval!r}: need "
                f"{low:g} <= heartbeat_interval <= {high:g} (seconds; the SuperLink's limits)"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"site config: log_level={self.log_level!r}: one of {LOG_LEVELS}")
        if self.log_max_bytes < 1024 or self.log_backups < 1:
            raise ConfigError(
                f"site config: log_max_bytes={self.log_max_bytes}, log_backups="
                f"{self.log_backups}: need log_max_bytes >= 1024 and log_backups >= 1"
            )
        from fedhealth.security.apps import INSTALLED, check_sha256

        self.approved_apps = [
            h if h == INSTALLED else check_sha256(h, "site config: approved_apps")
            for h in self.approved_apps
        ]
        return self

    @property
    def apps_log(self) -> Path:
        """The record of every app the site ran or refused, ``<state_dir>/apps.jsonl``."""
        return self.state / "apps.jsonl"

    @property
    def log_level_number(self) -> int:
        """``log_level`` as the logging module's number (``"info"``: ``logging.INFO``)."""
        return logging.getLevelNamesMapping()[self.log_level.upper()]

    @property
    def state(self) -> Path:
        """The state directory (``state_dir``)."""
        return Path(self.state_dir)

    @property
    def ledger_path(self) -> Path:
        """The site's privacy ledger, ``<ledger_dir>/ledger.sqlite``."""
        return Path(self.ledger_dir) / "ledger.sqlite"


def load(path: Path | None, overrides: list[str], *, insecure: bool = False) -> SiteSettings:
    """Load ``site.yaml`` and ``key=value`` overrides, and check them.

    Parameters
    ----------
    path : Path or None
        The ``site.yaml`` (relative paths in it are relative to its directory); None: the
        overrides only.
    overrides : list of str
        ``key=value`` items, applied after the file.
    insecure : bool, optional
        Force plaintext without authentication (``--insecure``; default False: as the file
        says).

    Returns
    -------
    SiteSettings
        The checked settings.

    Raises
    ------
    ConfigError
        A file, key or value is missing or wrong; the message names it.
    """
    settings = load_settings(SiteSettings, path, overrides, SiteSettings.PATHS, "site")
    settings.insecure = settings.insecure or insecure
    return settings.validate()
