"""The site's ClientApp: train and evaluate handlers plus the secure-aggregation stages.

``clients/client_app.py`` exposes :func:`make_client_app` to ``flwr run``; ``fedhealth simulate``
binds the data root and the sites' budgets directly.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedhealth.protocol.keys import STAGES

if TYPE_CHECKING:  # torch, MONAI and Opacus load only where a handler needs them, so the light
    # secure-aggregation stages start fast in a fresh ClientApp process.
    from fedhealth.config import PrivacyConfig


def make_client_app(
    data_root: str | None = None,
    privacy: PrivacyConfig | None = None,
    mods: list[Mod] | None = None,
) -> ClientApp:
    """``data_root`` and ``privacy`` (the sites' own budget) only in simulation; ``mods`` are
    Flower client mods (tests use one to capture every byte a site sends).
    """
    site_log = logging.getLogger("fedhealth")
    if not site_log.handlers:  # the site's log: plan, spend, refusals, data errors
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        site_log.addHandler(handler)
        site_log.setLevel(logging.INFO)
        site_log.propagate = False
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from fedhealth.clientapp import handlers

        return handlers.handle(msg, context, "train", data_root, privacy)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        from fedhealth.clientapp import handlers

        return handlers.handle(msg, context, "evaluate", data_root, privacy)

    from fedhealth.clientapp.secagg_stages import handle_stage

    for stage in STAGES:

        def run_stage(msg: Message, context: Context, stage: str = stage) -> Message:
            return handle_stage(msg, context, stage, data_root, privacy)

        app.train(stage)(run_stage)

    return app
