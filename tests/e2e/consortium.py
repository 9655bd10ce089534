"""A consortium on loopback for the reliability tests, as real processes.

`fedhealth server run` (SuperLink with TLS and enrolment), one `fedhealth site run` daemon per
site, `fedhealth server launch`: the same commands an operator and a hospital run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhealth.security.apps import build_fab, fab_sha256
from fedhealth.security.certs import create_ca, create_server_cert, create_site_keys
from fedhealth.service.process import signal_group
from fedhealth.testing.loopback import BIN, Procs, flower_env, free_ports


class Consortium:
    def __init__(
        self,
        root: Path,
        cohort: Path,
        sites: int,
        isolation: str = "warm",
        site_settings: tuple[str, ...] = (),
    ) -> None:
        self.root, self.cohort, self.isolation = root, cohort, isolation
        self.site_settings = site_settings  # extra site.yaml keys for every site
        self.certs = root / "certs"
        ca = create_ca(self.certs)
        create_server_cert(ca, self.certs, ["localhost", "127.0.0.1"])
        self.names = [f"site-{i}" for i in range(sites)]
        for name in self.names:
            create_site_keys(self.certs, name)
        self.port, self.control, *self.appio = free_ports(2 + sites)
        self.procs = Procs(root, flower_env(root / "flwr-home"))
        from fedhealth.security.apps import project_dir

        # what `fedhealth server launch` submits: the sites and the coordinator approve it
        self.fab_hash = fab_sha256(build_fab(project_dir()))

    # -- coordinator -------------------------------------------------------------------------
    def coordinator_args(self) -> list[str]:
        return [
            "fedhealth",
            "server",
            "run",
            f"ca={self.certs / 'ca.crt'}",
            f"cert={self.certs / 'server.crt'}",
            f"key={self.certs / 'server.key'}",
            f"enrolled={self.certs}",
            f"state_dir={self.root / 'coordinator'}",
            "host=127.0.0.1",
            f"control_port={self.control}",
            f"port={self.port}",
            "backoff_initial=0.5",
            f"approved_apps=[{self.fab_hash}]",
        ]

    def start_coordinator(self, name: str = "coordinator") -> subprocess.Popen[bytes]:
        proc = self.procs.start(name, self.coordinator_args())
        self.wait(
            lambda: self.status(self.root / "coordinator").get("ready"),
            120,
            "coordinator ready (sites enrolled)",
        )
        return proc

    # -- sites -------------------------------------------------------------------------------
    def site_dir(self, name: str) -> Path:
        return self.root / name

    def site_args(self, name: str, data: Path | None = None) -> list[str]:
        index = self.names.index(name)
        keys = self.certs / "sites" / name
        return [
            "fedhealth",
            "site",
            "run",
            f"name={name}",
            f"coordinator=127.0.0.1:{self.port}",
            f"ca={self.certs / 'ca.crt'}",
            f"auth_key={keys / 'auth.key'}",
            f"data_dir={data or self.cohort / f'site-{index % 3}'}",
            f"ledger_dir={self.site_dir(name) / 'ledger'}",
            f"state_dir={self.site_dir(name) / 'state'}",
            f"appio_port={self.appio[index]}",
            f"isolation={self.isolation}",
            "backoff_initial=0.5",
            "backoff_max=4",
            "stop_grace=10",
            f"approved_apps=[{self.fab_hash}]",
            *self.site_settings,
        ]

    def start_site(self, name: str) -> subprocess.Popen[bytes]:
        return self.procs.start(name, self.site_args(name))

    def wait_connected(self, names: list[str], timeout: float = 120) -> None:
        self.wait(
            lambda: all(
                self.status(self.site_dir(n) / "state").get("state") == "connected" for n in names
            ),
            timeout,
            f"sites {names} connected",
        )

    # -- runs --------------------------------------------------------------------------------
    def launch(self, overrides: list[str], timeout: float = 600) -> subprocess.Popen[bytes]:
        return self.procs.start(
            "launch",
            [
                "fedhealth",
                "server",
                "launch",
                "--ca",
                str(self.certs / "ca.crt"),
                "--state-dir",
                str(self.root / "launcher"),
                "--address",
                f"127.0.0.1:{self.control}",
                "--timeout",
                str(timeout),
                *overrides,
            ],
        )

    def wait_exit(self, proc: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"no exit within {timeout}s:\n{self.procs.logs()}") from exc

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def status(state_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(
        self, predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.procs.logs()}")

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
        signal_group(pid, sig)

    def stop(self) -> None:
        self.procs.stop(timeout=30)


def fedhealth_bin() -> Path:
    return BIN / "fedhealth"
