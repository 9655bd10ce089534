"""The hospital's site daemon: one Flower SuperNode kept connected to the coordinator.

``fedhealth site run`` supervises ``flower-supernode`` with the site's TLS root, authentication
key, data directory, ledger and budget (reconnecting with backoff, stopping cleanly on SIGTERM,
logging state changes as JSON lines in a rotated file and as human lines on stderr:
:mod:`fedhealth.supernode.daemonlog`); ``fedhealth site check`` is the preflight
(:mod:`fedhealth.supernode.preflight`); ``fedhealth site status`` says what the daemon is doing
and what the site has spent (:mod:`fedhealth.supernode.sitestatus`, kept current from the site
events its ClientApps print).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedhealth.errors import ConfigError
from fedhealth.protocol import keys as K
from fedhealth.security.apps import AppPolicy
from fedhealth.service.process import flower_env
from fedhealth.service.supervisor import Child, Relayed, Supervisor
from fedhealth.supernode.daemonlog import setup_site_logging
from fedhealth.supernode.heartbeat import DEFAULT as HEARTBEAT_DEFAULT
from fedhealth.supernode.settings import SiteSettings
from fedhealth.supernode.sitestatus import DaemonEvent, watch_line

__all__ = ["check_app_gate", "node_config", "run", "supernode_argv"]

log = logging.getLogger("fedhealth.site")


def node_config(s: SiteSettings) -> str:
    """Write Flower's ``--node-config``: what the ClientApp learns about its site.

    Parameters
    ----------
    s : SiteSettings
        The site's settings.

    Returns
    -------
    str
        ``site-name='...' data-dir='...' ledger-dir='...' epsilon-cap=... delta=...
        privacy-unit='...' site-policy='{json}'`` (and ``egress-log``), paths absolute. The
        site's policy keys travel only here: the coordinator's run config cannot set them.

    Raises
    ------
    ConfigError
        A value holds a quote or a newline (it could not be quoted for Flower).
    """
    items: dict[str, str | float | bool | int] = {
        K.NODE_SITE_NAME: s.name,
        K.NODE_DATA_DIR: str(Path(s.data_dir).resolve()),
        K.NODE_LEDGER_DIR: str(Path(s.ledger_dir).resolve()),
        K.NODE_EPSILON_CAP: s.epsilon_cap,
        K.NODE_DELTA: s.delta,
        K.NODE_PRIVACY_UNIT: s.privacy_unit,
        K.NODE_POLICY: s.policy.to_json(),
        K.NODE_DEVICE: s.device,
    }
    if s.egress_log:
        items[K.NODE_EGRESS_LOG] = str(Path(s.egress_log).resolve())
    if s.dp_noise_seed is not None:
        log.warning(
            "site %s: dp_noise_seed is set: its DP noise is reproducible by whoever knows the "
            "seed (for tests that compare runs; never on patient data)",
            s.name,
        )
        items[K.NODE_NOISE_SEED] = s.dp_noise_seed
    for key, value in items.items():
        if isinstance(value, str) and ("'" in value or "\n" in value):
            raise ConfigError(f"site config: {key}={value!r} may not contain quotes or newlines")
    return " ".join(f"{k}={_toml(v)}" for k, v in items.items())


def _toml(value: str | float | bool) -> str:
    """Write one node-config value as Flower parses it (TOML): quoted, ``true``, or a number."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def supernode_argv(s: SiteSettings) -> list[str]:
    """Build the SuperNode's command line (through :mod:`fedhealth.supernode.paced`).

    Parameters
    ----------
    s : SiteSettings
        The site's settings.

    Returns
    -------
    list of str
        ``python -m fedhealth.supernode.paced --pull-interval S [--heartbeat-interval S]
        --enforce-approval <policy> --
        <flower-supernode args>``: the site's app gate (approved hashes, trusted publishers,
        ``apps.jsonl``; :mod:`fedhealth.supernode.approval`), TLS root and authentication key
        (or ``--insecure``), node config, ClientApp API port, and ``--isolation process`` for
        warm ClientApps.
    """
    argv = [
        sys.executable,
        "-m",
        "fedhealth.supernode.paced",
        "--pull-interval",
        str(s.pull_interval),
        *(
            ("--heartbeat-interval", str(s.heartbeat_interval))
            if s.heartbeat_interval != HEARTBEAT_DEFAULT
            else ()
        ),
        "--enforce-approval",
        "--site-name",
        s.name,
        "--apps-log",
        str(s.apps_log.resolve()),
        *(a for h in s.approved_apps for a in ("--approved-app", h)),
        *(
            ("--trusted-publishers", str(Path(s.trusted_publishers).resolve()))
            if s.trusted_publishers
            else ()
        ),
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


def check_app_gate(s: SiteSettings) -> AppPolicy:
    """Load the site's app policy and check that the gate fits the installed Flower.

    Parameters
    ----------
    s : SiteSettings
        The site's settings.

    Returns
    -------
    AppPolicy
        What the site accepts (maybe nothing: then every app is refused).

    Raises
    ------
    ConfigError
        ``approved_apps`` or the trusted-publishers file is invalid.
    PatchMismatch
        The gate does not fit Flower's SuperNode loop: the daemon does not start.
    """
    import importlib

    from fedhealth.supernode import approval

    policy = AppPolicy.load(s.approved_apps, s.trusted_publishers, "site config")
    approval.check_module(importlib.import_module(approval.MODULE))
    return policy


class CertificateExplainer:
    """Explain, once, a coordinator certificate this site's CA does not verify.

    gRPC reports a foreign, rotated or impostor CA as ``CERTIFICATE_VERIFY_FAILED`` only. At
    the first such line a child prints, one TLS handshake with the coordinator
    (:func:`fedhealth.security.tlsprobe.probe`) finds who issued the certificate it presents;
    the daemon logs that beside the CA the site trusts (subject and SHA-256 fingerprint).

    Parameters
    ----------
    s : SiteSettings
        The site's settings (``coordinator``, ``ca``, ``insecure``).
    """

    EVENT = "tls.verify_failed"

    def __init__(self, s: SiteSettings) -> None:
        self.settings, self.done = s, s.insecure or not s.ca

    def __call__(self, line: str) -> str | None:
        """Look at one child line; return the explanation logged (None: nothing to explain)."""
        if self.done or "CERTIFICATE_VERIFY_FAILED" not in line:
            return None
        self.done = True
        from fedhealth.security.tlsprobe import probe

        host, port = self.settings.coordinator.rsplit(":", 1)
        try:
            seen = probe(host.strip("[]"), int(port), self.settings.ca, timeout=5.0)
        except (OSError, ValueError) as exc:
            text = (
                f"TLS to {self.settings.coordinator} failed and no second look was possible: {exc}"
            )
        else:
            if seen.ok:  # verified now: the failure was another link's, or has passed
                return None
            text = f"the coordinator {self.settings.coordinator}: {seen.message}"
        log.warning(text, extra={"fields": {"event": self.EVENT, "site": self.settings.name}})
        return text


def run(s: SiteSettings) -> int:
    """Supervise the SuperNode (and the warm ClientApp executor) until SIGTERM.

    Every line they print goes through :func:`~fedhealth.supernode.sitestatus.watch_line`
    into ``<state_dir>/status.json`` and, once, into the daemon's log: ``<state_dir>/daemon.jsonl``
    (JSON lines, rotated at ``log_max_bytes``, ``log_backups`` kept) and stderr (human lines),
    at ``log_level``. The umask is 077: the ledger, state and logs it and its children create
    are owner-only.

    Parameters
    ----------
    s : SiteSettings
        The site's settings.

    Returns
    -------
    int
        0 after a clean stop.
    """
    os.umask(0o077)
    state = s.state
    policy = check_app_gate(s)  # fails closed: no gate, no SuperNode
    state.mkdir(parents=True, exist_ok=True)
    Path(s.ledger_dir).mkdir(parents=True, exist_ok=True)
    setup_site_logging(
        state / "daemon.jsonl",
        level=s.log_level_number,
        max_bytes=s.log_max_bytes,
        backups=s.log_backups,
    )
    if s.insecure:
        log.warning(
            "INSECURE MODE: no TLS and no site authentication; updates travel in "
            "plaintext. Never use this outside a lab.",
            extra={"fields": {"event": DaemonEvent.INSECURE.value}},
        )
    env = flower_env(state / "flwr", unbuffered=True)
    sup = Supervisor(
        state / "status.json", s.backoff_initial, s.backoff_max, stop_grace=s.stop_grace
    )
    sup.status.update(
        site=s.name,
        coordinator=s.coordinator,
        isolation=s.isolation,
        ledger=str(s.ledger_path.resolve()),
    )

    explain = CertificateExplainer(s)

    def hook(child: str, line: str) -> Relayed:
        explain(line)
        return watch_line(sup, child, line)

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
        "site %s app gate: %s; every decision in %s",
        s.name,
        policy.describe(),
        s.apps_log,
        extra={"fields": {"event": DaemonEvent.APP_GATE.value, "site": s.name}},
    )
    log.info(
        "site %s: connecting to %s",
        s.name,
        s.coordinator,
        extra={"fields": {"event": DaemonEvent.START.value, "site": s.name}},
    )
    return sup.run()
