"""The consortium the attack suite attacks: a TLS coordinator and two enrolled sites, on loopback.

The same commands an operator and a hospital run: ``fedhealth data synth`` (one site's images
carry a canary, :mod:`fedhealth.testing.attacks_evidence`), ``fedhealth certs``-style keys,
``fedhealth server run`` with a ``coordinator.yaml``, ``fedhealth site run`` with a ``site.yaml``
per site, ``fedhealth server launch`` for the real run. The attacker's vantage is a directory
holding only what a site holds: the fleet address, ``ca.crt`` and its own keys.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhealth.errors import FederationError
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.service.process import BIN, spawn
from fedhealth.superlink.settings import CoordinatorSettings
from fedhealth.supernode.settings import SiteSettings
from fedhealth.testing.loopback import Procs, flower_env, free_ports

SITES = ("site-0", "site-1")
OPERATOR = "coordinator"  # the operator's flwr connection (loopback Control API)
# A tiny run: one round of a small U-Net on a few 32 mm patients per site.
RUN_OVERRIDES = (
    "sites=2",
    "rounds=1",
    "model.channels=[4,8]",
    "model.strides=[2]",
    "train.local_epochs=1",
    "train.batch_size=2",
    "strategy.min_sites=2",
    "federation.round_timeout=180",
    "federation.rejoin_wait=5",
)
COHORT = ("sites=2", "data.train_per_site=4", "data.test_per_site=1", "data.fov=32", "seed=11")


def external_ipv4() -> str | None:
    """Find this host's first non-loopback IPv4 address (the one its LAN peers would use).

    Returns
    -------
    str or None
        The address of the interface that routes to a public address (no packet is sent), or
        None when the host has only loopback.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.254", 9))  # TEST-NET: only selects a route
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def has_field(settings: type[Any], name: str) -> bool:
    """Tell whether a settings dataclass has a key (an interface another change may add).

    Parameters
    ----------
    settings : type
        :class:`CoordinatorSettings` or :class:`SiteSettings`.
    name : str
        The key, e.g. ``"approved_apps"``.

    Returns
    -------
    bool
        True if ``site.yaml`` / ``coordinator.yaml`` accepts the key.
    """
    return name in {f.name for f in dataclasses.fields(settings)}


def fedhealth_cli(args: list[str], cwd: Path, timeout: float = 300.0) -> str:
    """Run ``fedhealth <args>`` to completion.

    Parameters
    ----------
    args : list of str
        The subcommand and its arguments.
    cwd : Path
        Working directory.
    timeout : float, optional
        Seconds it may take (default 300).

    Returns
    -------
    str
        Its output (stdout and stderr).

    Raises
    ------
    FederationError
        It exited non-zero; the message has its output.
    """
    done = subprocess.run(
        [str(BIN / "fedhealth"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flower_env(cwd / ".flwr"),
    )
    if done.returncode != 0:
        raise FederationError(
            f"fedhealth {' '.join(args[:3])}: exit {done.returncode}:\n"
            f"{(done.stdout + done.stderr)[-2000:]}"
        )
    return done.stdout + done.stderr


class Lab:
    """A loopback consortium: coordinator, two enrolled sites, an attacker's vantage.

    Parameters
    ----------
    root : Path
        Working directory (created); everything the suite writes goes below it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.certs, self.foreign = self.root / "certs", self.root / "foreign-ca"
        self.cohort, self.runs = self.root / "cohort", self.root / "runs"
        self.coord_dir, self.attacker = self.root / "coordinator", self.root / "attacker"
        self.markers = self.root / "markers"  # where attack apps' code would leave a trace
        self.received = self.coord_dir / "received"  # what attack ServerApps got back
        for path in (self.coord_dir, self.attacker, self.markers, self.received, self.runs):
            path.mkdir(parents=True, exist_ok=True)
        self.external = external_ipv4()
        self.port, self.control, *self.appio = free_ports(2 + len(SITES))
        self.procs = Procs(self.root, flower_env(self.root / "flwr-home"))
        self.operator_env = flower_env(self.coord_dir / "operator")
        self.attacker_env = flower_env(self.attacker / "flwr-home")
        self.site_approved: list[str] = []
        self.coordinator_approved: list[str] = []
        self.notes: list[str] = []
        self.release: Path | None = None  # the frozen project the real run submits

    # -- keys and data ---------------------------------------------------------------------
    def make_keys(self) -> None:
        """Make the consortium CA, a coordinator cert for every address, site keys, a foreign CA."""
        ca = create_ca(self.certs)
        names = ["localhost", "127.0.0.1"] + ([self.external] if self.external else [])
        create_server_cert(ca, self.certs, names)
        for name in (*SITES, "intruder"):
            create_site_keys(self.certs, name)
        foreign = create_ca(self.foreign, name="foreign CA")
        create_server_cert(foreign, self.foreign, ["localhost", "127.0.0.1"])
        create_site_keys(self.attacker, "rogue")  # a fresh key, made at the site's vantage
        shutil.copy(self.certs / "ca.crt", self.attacker / "ca.crt")

    def make_cohort(self) -> None:
        """``fedhealth data synth``: two small sites of real NIfTI files."""
        fedhealth_cli(["data", "synth", *COHORT, f"data.root={self.cohort}"], self.root)

    def site_data(self, name: str) -> Path:
        """Return the data directory of site ``name``."""
        return self.cohort / f"site-{SITES.index(name)}"

    def site_dir(self, name: str) -> Path:
        """Return the state directory tree of site ``name`` (ledger, state, egress log, yaml)."""
        return self.root / "sites" / name

    # -- the coordinator -------------------------------------------------------------------
    def enrol(self, config: Path) -> None:
        """Enrol both sites' public keys, as the operator does, before the coordinator starts.

        ``fedhealth server enrol NAME --key auth.pub`` where the CLI has it, else the key is
        placed under ``enrolled/sites/<name>/auth.pub`` (registered at start).
        """
        probe = [str(BIN / "fedhealth"), "server", "enrol", "--help"]
        has_cli = subprocess.run(probe, capture_output=True, timeout=60).returncode == 0
        for name in SITES:
            pub = self.certs / "sites" / name / "auth.pub"
            if has_cli:
                fedhealth_cli(
                    ["server", "enrol", name, "--key", str(pub), "--config", str(config)],
                    self.coord_dir,
                )
            else:
                target = self.coord_dir / "enrolled" / "sites" / name
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(pub, target / "auth.pub")

    def start_coordinator(self) -> None:
        """Write ``coordinator.yaml``, start ``fedhealth server run``, enrol the two sites."""
        settings: dict[str, Any] = {
            "host": "0.0.0.0",  # the Fleet API on every interface, as in production
            "port": self.port,
            "control_host": "127.0.0.1",
            "control_port": self.control,
            "ca": str(self.certs / "ca.crt"),
            "cert": str(self.certs / "server.crt"),
            "key": str(self.certs / "server.key"),
            "state_dir": str(self.coord_dir / "state"),
            "backoff_initial": 0.5,
        }
        settings["enrolled"] = str(self.coord_dir / "enrolled")
        if has_field(CoordinatorSettings, "approved_apps"):
            settings["approved_apps"] = self.coordinator_approved
        else:
            self.notes.append("coordinator.yaml has no approved_apps yet (app approval absent)")
        config = self.coord_dir / "coordinator.yaml"
        config.write_text(json.dumps(settings, indent=2))  # JSON is YAML
        self.enrol(config)
        self.procs.start("coordinator", ["fedhealth", "server", "run", "--config", str(config)])
        self.wait(lambda: self.status(self.coord_dir / "state").get("ready"), 120, "coordinator")
        home = self.coord_dir / "operator"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{OPERATOR}"\n\n[superlink.{OPERATOR}]\n'
            f'address = "127.0.0.1:{self.control}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    # -- the sites -------------------------------------------------------------------------
    def site_yaml(self, name: str, key: Path, data: Path, appio: int) -> Path:
        """Write a ``site.yaml`` for ``name`` (approved apps when the key exists)."""
        home = self.site_dir(name)
        home.mkdir(parents=True, exist_ok=True)
        settings: dict[str, Any] = {
            "name": name,
            "coordinator": f"127.0.0.1:{self.port}",
            "ca": str(self.certs / "ca.crt"),
            "auth_key": str(key),
            "data_dir": str(data),
            "ledger_dir": str(home / "ledger"),
            "state_dir": str(home / "state"),
            "appio_port": appio,
            "egress_log": str(home / "state" / "egress.jsonl"),
            "backoff_initial": 0.5,
            "backoff_max": 4.0,
            "stop_grace": 5.0,
            # the lab has two sites: each allows a secure sum of two (a hospital's default is 3)
            "policy": {"min_secagg_sites": len(SITES)},
        }
        if has_field(SiteSettings, "approved_apps"):
            settings["approved_apps"] = self.site_approved
        path = home / "site.yaml"
        path.write_text(json.dumps(settings, indent=2))
        return path

    def start_sites(self) -> None:
        """Start ``fedhealth site run`` for each site and wait until both are connected."""
        if not has_field(SiteSettings, "approved_apps"):
            self.notes.append("site.yaml has no approved_apps yet (app approval absent)")
        for name, appio in zip(SITES, self.appio, strict=True):
            key = self.certs / "sites" / name / "auth.key"
            config = self.site_yaml(name, key, self.site_data(name), appio)
            self.procs.start(name, ["fedhealth", "site", "run", "--config", str(config)])
        self.wait(
            lambda: all(
                self.status(self.site_dir(n) / "state").get("state") == "connected" for n in SITES
            ),
            180,
            "both sites connected",
        )

    def launch(self, run_name: str) -> subprocess.Popen[bytes]:
        """Start ``fedhealth server launch`` of the consortium's real run (in the background).

        With :attr:`release` set, the launcher imports fedhealth from that frozen copy, so the
        FAB it submits is the one the sites approved.
        """
        env = dict(self.procs.env)
        if self.release is not None:
            env["PYTHONPATH"] = str(self.release)
            env["FEDHEALTH_CONFIG_DIR"] = str(self.release / "configs")
        argv = [
            str(BIN / "fedhealth"),
            "server",
            "launch",
            "--ca",
            str(self.certs / "ca.crt"),
            "--state-dir",
            str(self.coord_dir / "launcher"),
            "--address",
            f"127.0.0.1:{self.control}",
            "--timeout",
            "420",
            *RUN_OVERRIDES,
            f"run_root={self.runs}",
            f"run_name={run_name}",
        ]
        log = self.root / "launch.log"
        with log.open("wb") as out:
            proc = spawn(argv, cwd=self.root, env=env, stdout=out)
        self.procs.running.append(("launch", proc, log))
        return proc

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def status(state_dir: Path) -> dict[str, Any]:
        """Read a service's ``status.json`` (empty while there is none)."""
        try:
            loaded = json.loads((state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def wait(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        """Poll ``predicate`` every 0.5 s; FederationError with every log after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise FederationError(
            f"attack suite: no {what} within {timeout:.0f}s:\n{self.procs.logs()}"
        )

    def log(self, name: str) -> str:
        """Read the log of the process started as ``name``."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop every process the suite started."""
        self.procs.stop(timeout=20)
