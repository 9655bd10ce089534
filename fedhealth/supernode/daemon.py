"""The hospital's site daemon: one Flower SuperNode kept connected to the coordinator.

``fedhealth site run`` supervises ``flower-supernode`` with the site's TLS root, authentication
key, data directory, ledger and budget (reconnecting with backoff, stopping cleanly on SIGTERM,
logging JSON lines); ``fedhealth site check`` is the preflight; ``fedhealth site status`` says
what the daemon is doing and what the site has spent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import ssl
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhealth.errors import ConfigError
from fedhealth.protocol import keys as K
from fedhealth.service.settings import load_settings
from fedhealth.service.supervisor import Child, Supervisor, setup_json_logging  # noqa: F401
from fedhealth.supernode.paced import MAX_INTERVAL

log = logging.getLogger("fedhealth.site")

ISOLATION = ("warm", "subprocess")


@dataclass
class SiteSettings:
    """A hospital's ``site.yaml`` (every key can also be given as ``key=value``)."""

    name: str = "???"
    coordinator: str = "???"  # host:port of the coordinator's Fleet API
    ca: str = ""  # consortium ca.crt (TLS root)
    auth_key: str = ""  # the site's private authentication key (0600)
    data_dir: str = "???"  # directory holding the site's dataset.json
    ledger_dir: str = "???"  # the privacy ledger (ledger.sqlite) lives here
    state_dir: str = "state"  # status.json, daemon.jsonl, Flower's app cache
    epsilon_cap: float = 8.0
    delta: float = 1e-5
    appio_port: int = 9094  # the SuperNode's local ClientApp API port
    isolation: str = "warm"  # warm: ClientApps fork from a pre-loaded process
    pull_interval: float = 0.5  # seconds between the SuperNode's polls (Flower: 3 s)
    backoff_initial: float = 1.0  # seconds before the first restart of the SuperNode
    backoff_max: float = 60.0
    stop_grace: float = 30.0  # SIGTERM -> wait this long for a running ClientApp
    egress_log: str = ""  # optional JSON-lines record of every reply sent
    insecure: bool = False  # plaintext, no authentication: labs only

    PATHS = ("ca", "auth_key", "data_dir", "ledger_dir", "state_dir", "egress_log")

    def validate(self) -> SiteSettings:
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
        if self.isolation not in ISOLATION:
            raise ConfigError(f"site config: isolation={self.isolation!r}: one of {ISOLATION}")
        if not 0 < self.pull_interval <= MAX_INTERVAL:
            raise ConfigError(
                f"site config: pull_interval={self.pull_interval!r}: need "
                f"0 < pull_interval <= {MAX_INTERVAL:g} (seconds)"
            )
        return self

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def ledger_path(self) -> Path:
        return Path(self.ledger_dir) / "ledger.sqlite"


def load(path: Path | None, overrides: list[str], insecure: bool = False) -> SiteSettings:
    settings = load_settings(SiteSettings, path, overrides, SiteSettings.PATHS, "site")
    settings.insecure = settings.insecure or insecure
    return settings.validate()


# -- run -------------------------------------------------------------------------------------------
def node_config(s: SiteSettings) -> str:
    """Flower ``--node-config``: what the ClientApp learns about its site."""
    items: dict[str, str | float] = {
        K.NODE_SITE_NAME: s.name,
        K.NODE_DATA_DIR: str(Path(s.data_dir).resolve()),
        K.NODE_LEDGER_DIR: str(Path(s.ledger_dir).resolve()),
        K.NODE_EPSILON_CAP: s.epsilon_cap,
        K.NODE_DELTA: s.delta,
    }
    if s.egress_log:
        items[K.NODE_EGRESS_LOG] = str(Path(s.egress_log).resolve())
    for key, value in items.items():
        if isinstance(value, str) and ("'" in value or "\n" in value):
            raise ConfigError(f"site config: {key}={value!r} may not contain quotes or newlines")
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v!r}" for k, v in items.items())


def supernode_argv(s: SiteSettings) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "fedhealth.supernode.paced",
        "--pull-interval",
        str(s.pull_interval),
        "--",
        "--superlink",
        s.coordinator,
        "--node-config",
        node_config(s),
        "--port",
        str(s.appio_port),
    ]
    if s.insecure:
        argv.append("--insecure")
    else:
        argv += [
            "--root-certificates",
            str(Path(s.ca).resolve()),
            "--auth-supernode-private-key",
            str(Path(s.auth_key).resolve()),
        ]
    if s.isolation == "warm":
        argv += ["--isolation", "process"]
    return argv


def service_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


_TRAINED = re.compile(
    r"site (\S+) round (\d+): trained, loss ([0-9.eE+-]+|nan)"
    r"(?:, epsilon ([0-9.]+) of ([0-9.]+))?"
)
_EVALUATED = re.compile(r"site (\S+) round (\d+): dice ([0-9.]+)")
_STARTED = re.compile(r"site (\S+) round (\d+): (train|evaluate) started")


def watch_line(sup: Supervisor, _child: str, line: str) -> None:
    """Turn what the SuperNode and ClientApps print into the daemon's status."""
    if "SuperNode ID:" in line:
        sup.set_status(state="connected", node_id=line.rsplit(":", 1)[1].strip(), reason="")
    elif "Failed to activate SuperNode" in line or "not registered" in line.lower():
        log.error(
            "the coordinator refused to activate this site: its key is not enrolled, or "
            "the site's previous session has not expired yet (after a crash); retrying",
            extra={"fields": {"event": "auth.refused"}},
        )
        sup.set_status(
            state="refused",
            reason="activation refused: key not enrolled, or the previous session not expired yet",
        )
    elif "Connection attempt failed" in line or "UNAVAILABLE" in line:
        sup.set_status(state="reconnecting")
    elif m := _STARTED.search(line):
        sup.set_status(
            state="connected", activity=f"{m.group(3)} round {m.group(2)} since {_now()}"
        )
    elif m := _TRAINED.search(line):
        last = {"round": int(m.group(2)), "loss": m.group(3), "at": _now()}
        if m.group(4):
            last.update(epsilon=float(m.group(4)), epsilon_cap=float(m.group(5)))
        sup.set_status(activity="idle", last_trained=last)
    elif m := _EVALUATED.search(line):
        sup.set_status(
            activity="idle",
            last_evaluated={"round": int(m.group(2)), "dice": float(m.group(3)), "at": _now()},
        )
    elif "refusing to train" in line or "cannot fit at any noise level" in line:
        sup.set_status(activity="budget exhausted: refusing to train", budget_exhausted=True)


def run(s: SiteSettings) -> int:
    """Supervise the SuperNode (and the warm ClientApp executor) until SIGTERM."""
    state = s.state
    state.mkdir(parents=True, exist_ok=True)
    Path(s.ledger_dir).mkdir(parents=True, exist_ok=True)
    setup_json_logging(state / "daemon.jsonl")
    if s.insecure:
        log.warning(
            "INSECURE MODE: no TLS and no site authentication; updates travel in "
            "plaintext. Never use this outside a lab.",
            extra={"fields": {"event": "insecure"}},
        )
    env = service_env(state / "flwr")
    sup = Supervisor(
        state / "status.json", s.backoff_initial, s.backoff_max, stop_grace=s.stop_grace
    )
    sup.status.update(
        site=s.name,
        coordinator=s.coordinator,
        isolation=s.isolation,
        ledger=str(s.ledger_path.resolve()),
    )

    def hook(child: str, line: str) -> None:
        watch_line(sup, child, line)

    sup.add(Child("supernode", supernode_argv(s), env, state, hook))
    if s.isolation == "warm":
        argv = [
            sys.executable,
            "-m",
            "fedhealth.supernode.warm",
            "--appio-api-address",
            f"127.0.0.1:{s.appio_port}",
            "--parent-pid",
            str(os.getpid()),
            "--poll-interval",
            "0.1",
            "--grace-period",
            str(max(1.0, s.stop_grace - 5)),
        ]
        sup.add(Child("clientapp-executor", argv, env, state, hook))
    log.info(
        "site %s: connecting to %s",
        s.name,
        s.coordinator,
        extra={"fields": {"event": "site.start", "site": s.name}},
    )
    return sup.run()


# -- check -----------------------------------------------------------------------------------------
@dataclass
class CheckItem:
    name: str
    ok: bool
    detail: str


def check(s: SiteSettings, timeout: float = 10.0) -> list[CheckItem]:
    """Preflight: data, keys, ledger, coordinator; each item passes or says what is wrong."""
    return [_check_data(s), *_check_keys(s), _check_ledger(s), _check_coordinator(s, timeout)]


def _check_data(s: SiteSettings) -> CheckItem:
    from fedhealth.data.loading import read_datalist
    from fedhealth.errors import DataError

    path = Path(s.data_dir) / "dataset.json"
    try:
        data = read_datalist(path)  # every image/label pair opened and checked
    except DataError as exc:
        return CheckItem("data", False, str(exc))
    patients = {i["patient"] for i in data.train}
    return CheckItem(
        "data",
        True,
        f"{path}: {len(data.train)} training scans of "
        f"{len(patients)} patients, {len(data.test)} test scans, "
        "every file readable and consistent",
    )


def _check_keys(s: SiteSettings) -> list[CheckItem]:
    if s.insecure:
        return [CheckItem("keys", False, "insecure mode: no TLS root, no authentication key")]
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedhealth.security.certs import WARN_DAYS

    items = []
    try:
        cert = x509.load_pem_x509_certificate(Path(s.ca).read_bytes())
        left = (cert.not_valid_after_utc - datetime.now(UTC)).days
        ok = left >= WARN_DAYS
        items.append(
            CheckItem(
                "ca",
                ok,
                f"{s.ca}: {cert.subject.rfc4514_string()}, "
                + (f"valid until {cert.not_valid_after_utc:%Y-%m-%d}" if left >= 0 else "EXPIRED")
                + ("" if ok else f" (under {WARN_DAYS} days left)"),
            )
        )
    except (OSError, ValueError) as exc:
        items.append(CheckItem("ca", False, f"{s.ca}: not a readable PEM certificate ({exc})"))
    key_path = Path(s.auth_key)
    try:
        key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        mode = key_path.stat().st_mode & 0o777
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            items.append(CheckItem("auth_key", False, f"{key_path}: not an ECDSA key"))
        elif mode & 0o077:
            items.append(
                CheckItem(
                    "auth_key",
                    False,
                    f"{key_path}: mode {mode:o}, readable by others; chmod 600 it",
                )
            )
        else:
            items.append(
                CheckItem("auth_key", True, f"{key_path}: ECDSA {key.curve.name}, mode {mode:o}")
            )
    except (OSError, ValueError) as exc:
        items.append(
            CheckItem("auth_key", False, f"{key_path}: not a readable OpenSSH private key ({exc})")
        )
    return items


def _check_ledger(s: SiteSettings) -> CheckItem:
    from fedhealth.errors import LedgerError
    from fedhealth.privacy.ledger import PrivacyLedger

    path = s.ledger_path
    if not path.exists():
        existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        writable = os.access(existing, os.W_OK)
        return CheckItem(
            "ledger",
            writable,
            f"{path}: new ledger, created on first training"
            + ("" if writable else f"; but {existing} is not writable, so it cannot be created"),
        )
    try:
        with PrivacyLedger(path, s.name) as ledger:
            entries = ledger.verify()
    except LedgerError as exc:
        return CheckItem("ledger", False, str(exc))
    spent = entries[-1].epsilon_after if entries else 0.0
    ok = spent < s.epsilon_cap
    return CheckItem(
        "ledger",
        ok,
        f"{path}: {len(entries)} entries, hash chain intact, epsilon "
        f"{spent:.3f} of {s.epsilon_cap:g} spent" + ("" if ok else " (budget exhausted)"),
    )


def _check_coordinator(s: SiteSettings, timeout: float) -> CheckItem:
    host, port = s.coordinator.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            if s.insecure:
                return CheckItem("coordinator", True, f"{s.coordinator}: TCP reachable (plaintext)")
            context = ssl.create_default_context(cafile=s.ca)
            context.set_alpn_protocols(["h2"])
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return CheckItem(
                    "coordinator",
                    True,
                    f"{s.coordinator}: reachable, TLS "
                    f"{tls.version()} certificate verified against {s.ca}",
                )
    except ssl.SSLError as exc:
        return CheckItem("coordinator", False, f"{s.coordinator}: TLS failed ({exc.reason or exc})")
    except OSError as exc:
        return CheckItem("coordinator", False, f"{s.coordinator}: not reachable ({exc})")


# -- status ----------------------------------------------------------------------------------------
def status(s: SiteSettings) -> dict[str, Any]:
    """The daemon's last status (and whether it still runs) plus the ledger's totals."""
    out: dict[str, Any] = {"site": s.name, "daemon": "never started"}
    status_file = s.state / "status.json"
    if status_file.is_file():
        daemon = json.loads(status_file.read_text())
        alive = _alive(int(daemon.get("pid", 0)))
        out["daemon"] = (
            daemon
            if alive or daemon.get("state") == "stopped"
            else {**daemon, "state": f"not running (last state {daemon.get('state')!r})"}
        )
    if s.ledger_path.exists():
        from fedhealth.privacy.ledger import PrivacyLedger

        with PrivacyLedger(s.ledger_path, s.name) as ledger:
            entries = ledger.verify()
        spent = entries[-1].epsilon_after if entries else 0.0
        out["privacy"] = {
            "epsilon_spent": spent,
            "epsilon_cap": s.epsilon_cap,
            "delta": s.delta,
            "rounds_trained": len(entries),
            "runs": sorted({e.run for e in entries}),
            "last": (
                {"run": entries[-1].run, "round": entries[-1].round, "at": entries[-1].created}
                if entries
                else None
            ),
        }
    else:
        out["privacy"] = {"epsilon_spent": 0.0, "epsilon_cap": s.epsilon_cap, "rounds_trained": 0}
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
