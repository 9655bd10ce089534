"""``fedhealth simulate``: N sites on Flower's simulation engine (Ray), one process tree."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod
from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig
from flwr.simulation import run_simulation

from fedhealth.clientapp.app import make_client_app
from fedhealth.config import Config
from fedhealth.data.datalist import read_datalist
from fedhealth.data.sites import check_declared, resolve_site_dirs
from fedhealth.errors import RunIncomplete
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.app import make_server_app

log = logging.getLogger("fedhealth.simulate")


def ensure_sites(cfg: Config) -> list[Path]:
    """Return the run's site folders, checked: a hospital's own, or the synthetic cohort's.

    Parameters
    ----------
    cfg : Config
        The run's config: ``data.site_dirs``, or ``data.root``, ``sites``, ``seed`` and the
        synthetic cohort's sizes (missing synthetic sites are written, into a folder
        fedhealth created, never over a file).

    Returns
    -------
    list of Path
        Absolute site folders, each with its ``dataset.json``, in site order.

    Raises
    ------
    DataError
        A site is missing, unreadable, or declares other sequences or classes than
        ``cfg.model`` (the message names the folder).
    """
    dirs = resolve_site_dirs(cfg)
    for d in dirs:
        check_declared(read_datalist(d / "dataset.json", check_files=False), cfg, d.name)
    return dirs


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch (read when ``ray`` is imported) that, set to ``0``, makes its node address the
loopback one; ``_node_ip_address="127.0.0.1"`` alone is turned into the host's reachable IP."""


def ray_loopback_args(num_cpus: int) -> dict[str, Any]:
    """Return ``ray.init`` arguments under which every Ray server listens on 127.0.0.1 only.

    Ray 2.55 binds its GCS, raylet, object manager and worker gRPC servers to the node's IP
    address; by default that is the host's external address (and ``*`` for some), and it
    replaces ``127.0.0.1`` given as ``_node_ip_address`` by that address unless Ray believes it
    is not a cluster (:data:`RAY_LOOPBACK_ENV` ``=0``). This sets that switch for this process
    and its Ray children (and in Ray's constants when ``ray`` is already imported), and turns
    the dashboard off. Measured with ``ss -ltnp``: loopback only.

    Parameters
    ----------
    num_cpus : int
        CPUs Ray may use.

    Returns
    -------
    dict of str to Any
        For Flower's ``backend_config["init_args"]``.
    """
    os.environ[RAY_LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported earlier in this process: the switch was read already
        constants.__dict__["ENABLE_RAY_CLUSTER"] = False
    return {"num_cpus": num_cpus, "include_dashboard": False, "_node_ip_address": "127.0.0.1"}


def simulate(
    cfg: Config,
    client_mods: list[Mod] | None = None,
    *,
    console: Callable[[RunDir], AbstractContextManager[object]] | None = None,
) -> RunDir:
    """Run the configured federation over ``cfg.sites`` virtual sites on Flower's simulation engine.

    Parameters
    ----------
    cfg : Config
        The resolved run config (``configs/config.yaml`` plus overrides).
    client_mods : list of Flower client mods, optional
        Wrapped around every site's ClientApp (tests use one to capture what a site sends).
    console : callable, optional
        Keyword-only. Given the run directory, returns a context the simulation runs in (the
        CLI's progress bar and log file: :mod:`fedhealth.reports.progress`); with it, Ray's
        workers do not print to this terminal (their lines stay in Ray's own logs).

    Notes
    -----
    In simulation the researcher plays every site, so the sites' own privacy policy follows
    the run: each virtual site requires DP exactly when ``cfg.privacy.enabled`` (a
    ``privacy=off`` baseline trains, and its replies say DP was off by the site's choice), and
    its privacy unit is the patient (the synthetic cohort names a patient per scan). See
    :meth:`fedhealth.clientapp.instruction.Site.from_context`.

    Returns
    -------
    RunDir
        The run directory: config, metrics, checkpoints, manifest.

    Raises
    ------
    RunIncomplete
        If the run ended before its last round without a clean stop.
    """
    dirs = ensure_sites(cfg)
    run_dir = RunDir.create(cfg)
    num_cpus = cfg.federation.ray_num_cpus or os.cpu_count() or 1
    backend: BackendConfig = {
        "client_resources": {"num_cpus": cfg.federation.cpus_per_site, "num_gpus": 0.0},
        "init_args": ray_loopback_args(num_cpus),
    }
    if console is not None:
        backend["init_args"]["log_to_driver"] = False
    with console(run_dir) if console is not None else contextlib.nullcontext():
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=make_client_app(tuple(map(str, dirs)), cfg.privacy, client_mods),
            num_supernodes=cfg.sites,
            backend_config=backend,
        )
    if run_dir.manifest["rounds_completed"] != cfg.rounds and "stopped" not in run_dir.manifest:
        raise RunIncomplete(
            f"simulation ended after {run_dir.manifest['rounds_completed']} of {cfg.rounds} "
            f"rounds; see the log above and {run_dir.path}"
        )
    return run_dir
