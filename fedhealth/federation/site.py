"""What a site does with one instruction from the coordinator: train or evaluate, then reply.

Only parameters and aggregate metrics leave the site. Errors are logged here in full and replied
with a catalogue code and its fixed public text (:data:`fedhealth.errors.SITE_ERROR_CODES`): no
file names, no patient ids, no stack traces cross the network.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from torch import nn

from fedhealth.config import Config, from_site_settings
from fedhealth.data.loading import SiteData, make_loader, read_datalist
from fedhealth.data.synth import site_dir
from fedhealth.errors import SITE_ERROR_CODES, ConfigError, site_error_code
from fedhealth.models import build_model
from fedhealth.training import evaluate, seed_everything, train

log = logging.getLogger("fedhealth.site")


@dataclass(frozen=True)
class Site:
    """Who this site is and where its ``dataset.json`` lives (from the SuperNode's node config)."""

    name: str
    data_dir: Path

    @classmethod
    def from_context(cls, context: Context, data_root: str | None = None) -> Site:
        """``data-dir`` (and optional ``site-name``) in the node config; in simulation,
        ``partition-id`` under ``data_root``."""
        node = context.node_config
        if "data-dir" in node:
            data_dir = Path(str(node["data-dir"]))
            return cls(str(node.get("site-name", data_dir.name)), data_dir)
        if data_root is not None and "partition-id" in node:
            index = int(node["partition-id"])
            return cls(f"site-{index}", site_dir(data_root, index))
        raise ConfigError("node config needs 'data-dir' (path to the site's dataset directory)")

    def load(self) -> SiteData:
        return read_datalist(self.data_dir / "dataset.json")


def derive_seed(seed: int, site: str, server_round: int, phase: str) -> int:
    """A per-site, per-round seed: same config -> same randomness, sites independent."""
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}/{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _model_from(msg: Message, cfg: Config) -> nn.Module:
    model = build_model(cfg.model)
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"global model does not match model config: {exc}") from exc
    return model


def _reply(msg: Message, site: Site, metrics: dict[str, int | float], model: nn.Module | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})})
    if model is not None:
        content["arrays"] = ArrayRecord(model.state_dict())
    return Message(content=content, reply_to=msg)


def handle(msg: Message, context: Context, phase: str, data_root: str | None = None) -> Message:
    """Run ``phase`` ("train" or "evaluate") for the instruction ``msg``."""
    try:
        site = Site.from_context(context, data_root)
        settings = dict(msg.content["config"].items())
        cfg = from_site_settings(settings)
        server_round = int(settings.get("server-round", 0))
        data = site.load()
        seed = derive_seed(cfg.seed, site.name, server_round, phase)
        seed_everything(seed, cfg.train.num_threads)
        model = _model_from(msg, cfg)
        if phase == "train":
            loader = make_loader(data.train, cfg.data.roi, cfg.data.target_spacing,
                                 cfg.train.batch_size, True, seed, cfg.data.cache)
            result = train(model, loader, cfg.train.local_epochs, cfg.train.lr,
                           cfg.train.weight_decay, float(settings.get("proximal-mu", 0.0)))
            log.info("site %s round %d: trained, loss %.4f", site.name, server_round, result.loss)
            metrics = {"loss": result.loss, "num-examples": len(data.train), "steps": result.steps}
            return _reply(msg, site, metrics, model)
        loader = make_loader(data.test, cfg.data.roi, cfg.data.target_spacing,
                             cfg.train.batch_size, False, seed, cfg.data.cache)
        ev = evaluate(model, loader)
        log.info("site %s round %d: dice %.4f", site.name, server_round, ev.dice)
        return _reply(msg, site, {"dice": ev.dice, "loss": ev.loss, "num-examples": ev.num_examples}, None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a catalogued error reply
        code = site_error_code(exc)
        log.exception("%s failed (error %d): %s", phase, code, exc)
        return Message(Error(code=code, reason=SITE_ERROR_CODES[code]), reply_to=msg)
