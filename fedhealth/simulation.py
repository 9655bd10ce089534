"""``fedhealth simulate``: N sites on Flower's simulation engine (Ray), one process tree."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.clientapp.typing import Mod
from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig
from flwr.simulation import run_simulation

from fedhealth.clientapp.app import make_client_app
from fedhealth.config import Config
from fedhealth.data.synth import site_dir, write_cohort
from fedhealth.errors import RunIncomplete
from fedhealth.runs.rundir import RunDir
from fedhealth.serverapp.app import make_server_app

log = logging.getLogger("fedhealth.simulate")


def ensure_cohort(cfg: Config) -> Path:
    """Synthesize the sites' data under ``data.root`` unless every site already has a datalist.

    Parameters
    ----------
    cfg : Config
        The run's config: ``data.root``, ``sites``, ``seed`` and the ``data`` sizes.

    Returns
    -------
    Path
        ``data.root``, absolute, with ``site-<i>/dataset.json`` for every site.
    """
    root = Path(cfg.data.root).resolve()
    if all((site_dir(root, s) / "dataset.json").is_file() for s in range(cfg.sites)):
        return root
    log.info("writing synthetic cohort: %d sites under %s", cfg.sites, root)
    write_cohort(
        root,
        cfg.sites,
        cfg.seed,
        cfg.data.train_per_site,
        cfg.data.test_per_site,
        fov=cfg.data.roi,
        heterogeneity=cfg.data.heterogeneity,
    )
    return root


def simulate(cfg: Config, client_mods: list[Mod] | None = None) -> RunDir:
    """Run the configured federation over ``cfg.sites`` virtual sites on Flower's simulation engine.

    Parameters
    ----------
    cfg : Config
        The resolved run config (``configs/config.yaml`` plus overrides).
    client_mods : list of Flower client mods, optional
        Wrapped around every site's ClientApp (tests use one to capture what a site sends).

    Returns
    -------
    RunDir
        The run directory: config, metrics, checkpoints, manifest.

    Raises
    ------
    RunIncomplete
        If the run ended before its last round without a clean stop.
    """
    root = ensure_cohort(cfg)
    run_dir = RunDir.create(cfg)
    num_cpus = cfg.federation.ray_num_cpus or os.cpu_count() or 1
    backend: BackendConfig = {
        "client_resources": {"num_cpus": cfg.federation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(cfg, run_dir),
        client_app=make_client_app(str(root), cfg.privacy, client_mods),
        num_supernodes=cfg.sites,
        backend_config=backend,
    )
    if run_dir.manifest["rounds_completed"] != cfg.rounds and "stopped" not in run_dir.manifest:
        raise RunIncomplete(
            f"simulation ended after {run_dir.manifest['rounds_completed']} of {cfg.rounds} "
            f"rounds; see the log above and {run_dir.path}"
        )
    return run_dir
