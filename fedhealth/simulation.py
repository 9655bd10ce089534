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
from fedhealth.service.process import MALLOC_SETTINGS

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


SITES_LOG = "sites.log"
"""Every virtual site's own log lines, in the run directory (each site names itself)."""
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_ACCEL_ENV = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


class _PythonEntryPoint(logging.Filter):
    """Drop Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``.

    fedhealth calls it on purpose: ``flwr run`` would build and install a FAB through a
    simulation SuperLink for every run and cannot take in-process apps or client mods (the
    tests' egress capture); ``run_simulation`` is still Flower's documented Python entry point
    in 1.39. Only that one record is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


"""Ray's switch (read when ``ray`` is imported) that, set to ``0``, makes its node address the
loopback one; ``_node_ip_address="127.0.0.1"`` alone is turned into the host's reachable IP."""


def ray_loopback_args(num_cpus: int) -> dict[str, Any]:
    """Return ``ray.init`` arguments under which every Ray server listens on 127.0.0.1 only.

    Ray 2.55 binds its GCS, raylet, object manager and worker gRPC servers to the node's IP
    address; by default that is the host's external address (and ``*`` for some), and it
    replaces ``127.0.0.1`` given as ``_node_ip_address`` by that address unless Ray believes it
    is not a cluster (:data:`RAY_LOOPBACK_ENV` ``=0``). Ray's ``address="local"`` starts a new
    instance even when another process on this machine runs one (without it, ``ray.init``
    joins the cluster ``ray start`` last advertised and refuses ``num_cpus``). This sets that
    switch for this process and its Ray children (and in Ray's constants when ``ray`` is
    already imported), and turns
    the dashboard off. Measured with ``ss -ltnp``: loopback only. Ray's processes (the simulated
    sites' actors among them) also inherit glibc's allocator settings of Flower's own processes
    (:data:`~fedhealth.service.process.MALLOC_SETTINGS`, unless this environment sets them): a
    training step of a 30M-parameter U-Net 0.72 s -> 0.57-0.63 s on 2 cores.

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
    for name, value in MALLOC_SETTINGS.items():  # read by glibc when Ray's processes start
        os.environ.setdefault(name, value)
    # Sites ask for no GPU; Ray then leaves CUDA_VISIBLE_DEVICES as it is (its announced future
    # default). Saying so explicitly is what silences Ray's FutureWarning about it.
    os.environ.setdefault(RAY_ACCEL_ENV, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # imported earlier in this process: the switch was read already
        constants.__dict__["ENABLE_RAY_CLUSTER"] = False
    return {  # "local": a new instance, never one found on this machine (ray_current_cluster)
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_node_ip_address": "127.0.0.1",
    }


def ray_init_args(cfg: Config) -> dict[str, Any]:
    """Return Flower's ``init_args`` for Ray: a local instance on loopback, or a cluster to join.

    Parameters
    ----------
    cfg : Config
        ``federation.ray_address`` (``""``: start Ray here, :func:`ray_loopback_args` with
        ``federation.ray_num_cpus`` or every core) .

    Returns
    -------
    dict of str to Any
        For ``backend_config["init_args"]``. Joining a cluster passes only its address (and,
        for a cluster on 127.0.0.1, this driver's loopback address): the cluster's nodes bring
        their own CPUs and GPUs, and Ray places each virtual site where its
        ``client_resources`` fit. Every node must see the sites' folders and the ledger
        root at the same paths (a shared file system).
    """
    address = cfg.federation.ray_address
    if not address:
        return ray_loopback_args(cfg.federation.ray_num_cpus or os.cpu_count() or 1)
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("127.0.0.1", "localhost", "::1"):  # a cluster of nodes on this machine only:
        loopback = ray_loopback_args(1)  # this driver must register on loopback too
        return {"address": address, "_node_ip_address": loopback["_node_ip_address"]}
    return {"address": address}


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
    backend: BackendConfig = {
        "client_resources": {
            "num_cpus": cfg.federation.cpus_per_site,
            "num_gpus": cfg.federation.gpus_per_site,
        },
        "init_args": ray_init_args(cfg),
    }
    if console is not None:
        backend["init_args"]["log_to_driver"] = False
    entry_point = _PythonEntryPoint()
    logging.getLogger("flwr").addFilter(entry_point)
    with (
        console(run_dir) if console is not None else contextlib.nullcontext(),
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(logging.getLogger("flwr").removeFilter, entry_point)
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=make_client_app(
                tuple(map(str, dirs)),
                cfg.privacy,
                client_mods,
                device=cfg.train.device,
                site_log=str(run_dir.path.resolve() / SITES_LOG),
            ),
            num_supernodes=cfg.sites,
            backend_config=backend,
        )
    if run_dir.manifest["rounds_completed"] != cfg.rounds and "stopped" not in run_dir.manifest:
        raise RunIncomplete(
            f"simulation ended after {run_dir.manifest['rounds_completed']} of {cfg.rounds} "
            f"rounds; see the log above and {run_dir.path}"
        )
    return run_dir
