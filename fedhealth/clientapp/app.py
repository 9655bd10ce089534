"""The site's ClientApp: train and evaluate handlers plus the secure-aggregation stages.

``clients/client_app.py`` exposes :func:`make_client_app` to ``flwr run``; ``fedhealth simulate``
binds the data root and the sites' budgets directly. The ClientApp's log carries its site
events to the site daemon (:mod:`fedhealth.clientapp.sitelog`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedhealth.clientapp.sitelog import install_site_logging, log_to_file
from fedhealth.protocol.keys import STAGES

if TYPE_CHECKING:  # torch, MONAI and Opacus load only where a handler needs them, so the light
    # secure-aggregation stages start fast in a fresh ClientApp process.
    from fedhealth.config import PrivacyConfig


def make_client_app(
    site_dirs: tuple[str, ...] | None = None,
    privacy: PrivacyConfig | None = None,
    mods: list[Mod] | None = None,
    device: str = "auto",
    site_log: str | None = None,
) -> ClientApp:
    """Build the site's ClientApp and give its process the site log.

    The site log (:func:`fedhealth.clientapp.sitelog.install_site_logging`) prints the plan,
    spend, refusals and data errors to stderr, each site event at the end of its line: in a
    deployment that is how the site daemon learns what the ClientApp does.

    Parameters
    ----------
    site_dirs : tuple of str, optional
        Simulation only: every virtual site's folder, by partition id (default None: the
        node config names the site's data directory).
    privacy : PrivacyConfig, optional
        Simulation only: the sites' own budgets (default None: from the node config).
    mods : list of Mod, optional
        Flower client mods (default None: none; tests use one to capture every byte a site
        sends, deployments :class:`fedhealth.clientapp.egress.EgressLog`).
    device : str, default "auto"
        Simulation: where every virtual site trains (``train.device``); a deployed site's
        node config ``device`` (site.yaml) wins.
    site_log : str, optional
        Simulation: a file every virtual site's process appends its site log to
        (:func:`fedhealth.clientapp.sitelog.log_to_file`; default None: stderr only).

    Returns
    -------
    ClientApp
        Train and evaluate handlers plus one ``train.<stage>`` handler per secure-aggregation
        stage.
    """
    install_site_logging(events=site_dirs is None)  # simulation: no site daemon reads events
    app = ClientApp(mods=mods or [])

    def logged() -> None:  # in the process that handles the message (a Ray worker)
        if site_log is not None:
            log_to_file(site_log)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedhealth.clientapp import handlers

        logged()
        return handlers.handle(msg, context, "train", site_dirs, privacy, device)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedhealth.clientapp import handlers

        logged()
        return handlers.handle(msg, context, "evaluate", site_dirs, privacy, device)

    from fedhealth.clientapp.secagg_stages import handle_stage

    for stage in STAGES:

        def run_stage(msg: Message, context: Context, stage: str = stage) -> Message:
            logged()
            return handle_stage(msg, context, stage, site_dirs, privacy, device)

        app.train(stage)(run_stage)

    return app
