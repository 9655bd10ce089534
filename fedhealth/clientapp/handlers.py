"""What a site does with one instruction from the coordinator: train or evaluate, then reply.

Only parameters and aggregate metrics leave the site. Errors are logged here in full and replied
with a catalogue code and its fixed public text (:data:`fedhealth.errors.SITE_ERROR_CODES`): no
file names, no patient ids, no stack traces cross the network.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedhealth.config import Config, PrivacyConfig, from_site_settings
from fedhealth.data.loading import SiteData, load_site, make_loader
from fedhealth.data.synth import site_dir
from fedhealth.errors import ConfigError, LedgerError
from fedhealth.models import DP_READY, build_model
from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
from fedhealth.privacy.ledger import PrivacyLedger
from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import is_packed, layout, pack, unpack
from fedhealth.protocol.replies import error_reply
from fedhealth.training import DPSettings, evaluate, seed_everything, train

log = logging.getLogger("fedhealth.site")


@dataclass(frozen=True)
class Site:
    """Who this site is and where its ``dataset.json`` lives (from the SuperNode's node config)."""

    name: str
    data_dir: Path
    budget: SiteBudget | None = None

    @classmethod
    def from_context(
        cls, context: Context, data_root: str | None = None, privacy: PrivacyConfig | None = None
    ) -> Site:
        """Deployment: node config ``data-dir``, ``site-name``, ``ledger-dir``, ``epsilon-cap``,
        ``delta``. Simulation: ``partition-id`` under ``data_root``, budget from ``privacy``.
        """
        node = context.node_config
        if K.NODE_DATA_DIR in node:
            data_dir = Path(str(node[K.NODE_DATA_DIR]))
            budget = None
            if K.NODE_LEDGER_DIR in node:
                if K.NODE_EPSILON_CAP not in node:
                    raise ConfigError(
                        f"node config has '{K.NODE_LEDGER_DIR}' but no '{K.NODE_EPSILON_CAP}'"
                    )
                budget = SiteBudget(
                    float(node[K.NODE_EPSILON_CAP]),
                    float(node.get(K.NODE_DELTA, 1e-5)),
                    Path(str(node[K.NODE_LEDGER_DIR])) / "ledger.sqlite",
                )
            return cls(str(node.get(K.NODE_SITE_NAME, data_dir.name)), data_dir, budget)
        if data_root is not None and K.NODE_PARTITION_ID in node:
            index = int(node[K.NODE_PARTITION_ID])
            budget = None
            if privacy is not None:
                budget = SiteBudget(
                    privacy.epsilon,
                    privacy.delta,
                    Path(privacy.ledger_root).resolve() / f"site-{index}" / "ledger.sqlite",
                )
            return cls(f"site-{index}", site_dir(data_root, index), budget)
        raise ConfigError(
            f"node config needs '{K.NODE_DATA_DIR}' (path to the site's dataset directory)"
        )

    def load(self) -> SiteData:
        return load_site(self.data_dir / "dataset.json")


def derive_seed(seed: int, site: str, server_round: int, phase: str) -> int:
    """A per-site, per-round seed: same config -> same randomness, sites independent."""
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}/{phase}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def model_digest(arrays: ArrayRecord) -> str:
    """sha256 over the global model's keys, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        array = arrays[key]
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()


def _model_from(msg: Message, cfg: Config) -> nn.Module:
    """The global model the message carries, packed (:mod:`fedhealth.protocol.packing`) or
    one array per tensor.
    """
    model = build_model(cfg.model)
    arrays = msg.content[K.ARRAYS]
    try:
        if is_packed(arrays):
            state = {
                k: torch.from_numpy(v.copy())
                for k, v in unpack(arrays, layout(model.state_dict()), "global model").items()
            }
        else:
            state = arrays.to_torch_state_dict()
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise ConfigError(f"global model does not match model config: {exc}") from exc
    return model


def _check_outgoing(arrays: ArrayRecord, msg: Message, site: str) -> None:
    """A site validates what it sends: same keys, shapes and dtypes as the global model it
    received, finite values (the coordinator re-checks, but under secure aggregation it can
    only see the sum).
    """
    from fedhealth.security.validation import validate_update

    content = RecordDict({K.ARRAYS: arrays, K.METRICS: MetricRecord({K.NUM_EXAMPLES: 1})})
    validate_update(msg.content[K.ARRAYS], content, max_examples=1, site=site)


def _reply(
    msg: Message,
    site: Site,
    metrics: dict[str, int | float],
    arrays: ArrayRecord | None,
    about: dict | None = None,
) -> Message:
    about = {K.SITE_NAME: site.name, **(about or {})}
    content = RecordDict({K.METRICS: MetricRecord(metrics), K.SITE: ConfigRecord(about)})
    if arrays is not None:
        content[K.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def train_update(
    msg: Message,
    context: Context,
    site: Site,
    data: SiteData,
    cfg: Config,
    settings: dict,
    seed: int,
) -> tuple[ArrayRecord, dict, dict]:
    """Local (DP-)training for one instruction: (the update as sent, metrics, accounting for
    the reply). The update is validated before it is returned: the record checked is the record
    sent.
    """
    server_round = int(settings.get(K.SERVER_ROUND, 0))
    loader = make_loader(
        data.train,
        cfg.data.roi,
        cfg.data.target_spacing,
        cfg.train.batch_size,
        True,
        seed,
        cfg.data.cache,
    )
    dp, entry, privacy, accounting = None, None, {}, {}
    if cfg.privacy.enabled:
        if site.budget is None:
            raise ConfigError(f"site {site.name}: DP is on but the site has no ledger/budget")
        sample_rate, steps = 1.0 / len(loader), cfg.train.local_epochs * len(loader)
        request = RoundRequest(
            run=str(settings.get(K.RUN_KEY) or context.run_id),
            server_round=server_round,
            rounds_total=cfg.rounds,
            sample_rate=sample_rate,
            steps=steps,
            max_grad_norm=cfg.privacy.max_grad_norm,
            accountant=cfg.privacy.accountant,
            fixed_noise=cfg.privacy.noise_multiplier,
        )
        with PrivacyLedger(site.budget.ledger_path, site.name) as ledger:
            entry = charge_round(
                ledger,
                site.budget,
                request,
                data.fingerprint,
                site.name,
                model_digest(msg.content[K.ARRAYS]),
            )
            history = ledger.history()
        # The phases behind the reported epsilon, so anyone can recompute it independently.
        accounting = {
            K.ACCOUNTANT: cfg.privacy.accountant,
            K.HISTORY_NOISE: [h[0] for h in history],
            K.HISTORY_RATE: [h[1] for h in history],
            K.HISTORY_STEPS: [h[2] for h in history],
        }
        dp = DPSettings(
            entry.noise_multiplier,
            cfg.privacy.max_grad_norm,
            cfg.privacy.accountant,
            cfg.privacy.secure_rng,
            DP_READY[cfg.model.name],
        )
        privacy = {
            K.EPSILON: entry.epsilon_after,
            K.EPSILON_CAP: site.budget.epsilon_cap,
            K.DELTA: site.budget.delta,
            K.NOISE_MULTIPLIER: entry.noise_multiplier,
            K.SAMPLE_RATE: sample_rate,
            K.DP_STEPS: steps,
            K.MAX_GRAD_NORM: cfg.privacy.max_grad_norm,
        }
    model = _model_from(msg, cfg)
    started = time.perf_counter()
    lr = cfg.train.lr * cfg.train.lr_decay ** max(0, server_round - 1)
    result = train(
        model,
        loader,
        cfg.train.local_epochs,
        lr,
        cfg.train.weight_decay,
        float(settings.get(K.PROXIMAL_MU, 0.0)),
        dp,
    )
    if entry is not None and list(result.history) != [entry.phase]:
        raise LedgerError(
            f"site {site.name}: Opacus ran {result.history}, the ledger recorded "
            f"{entry.phase}: refusing to send the update"
        )
    # the update goes back in the form the global model came in
    arrays = (
        pack(model.state_dict())
        if is_packed(msg.content[K.ARRAYS])
        else ArrayRecord(model.state_dict())
    )
    _check_outgoing(arrays, msg, site.name)
    log.info(
        "site %s round %d: trained, loss %.4f%s",
        site.name,
        server_round,
        result.loss,
        f", epsilon {privacy['epsilon']:.3f} of {privacy['epsilon-cap']}" if privacy else "",
    )
    metrics = {
        K.LOSS: result.loss,
        K.NUM_EXAMPLES: len(loader.dataset),
        K.STEPS: result.steps,
        K.TRAIN_SECONDS: time.perf_counter() - started,
        **privacy,
    }
    return arrays, metrics, accounting


def prepare(
    msg: Message, context: Context, phase: str, data_root: str | None, privacy: PrivacyConfig | None
) -> tuple[Site, SiteData, Config, dict, int]:
    """Who the site is, its data, the run config from the instruction, and this phase's seed."""
    site = Site.from_context(context, data_root, privacy)
    settings = dict(msg.content[K.CONFIG].items())
    cfg = from_site_settings(settings)
    server_round = int(settings.get(K.SERVER_ROUND, 0))
    log.info("site %s round %d: %s started", site.name, server_round, phase)
    data = site.load()
    seed = derive_seed(cfg.seed, site.name, server_round, phase)
    seed_everything(seed, cfg.train.num_threads)
    return site, data, cfg, settings, seed


def evaluate_model(
    msg: Message, site: Site, data: SiteData, cfg: Config, server_round: int
) -> dict[str, int | float]:
    """Dice and loss of the global model in ``msg`` on the site's test cases, seeded as the
    evaluation of ``server_round``.
    """
    seed = derive_seed(cfg.seed, site.name, server_round, "evaluate")
    seed_everything(seed, cfg.train.num_threads)
    model = _model_from(msg, cfg)
    loader = make_loader(
        data.test,
        cfg.data.roi,
        cfg.data.target_spacing,
        cfg.train.batch_size,
        False,
        seed,
        cfg.data.cache,
    )
    ev = evaluate(model, loader)
    log.info("site %s round %d: dice %.4f", site.name, server_round, ev.dice)
    return {K.DICE: ev.dice, K.LOSS: ev.loss, K.NUM_EXAMPLES: ev.num_examples}


def folded_evaluation(
    msg: Message, site: Site, data: SiteData, cfg: Config, settings: dict
) -> dict[str, int | float]:
    """When the train instruction asks for it (``evaluate-round``), the received global model is
    evaluated after training (so training's random state is the same as without it) and the
    results ride along in the train reply as ``eval-*`` metrics. A failed evaluation is logged
    and left out: the update is still sent.
    """
    if K.EVALUATE_ROUND not in settings:
        return {}
    try:
        log.info(
            "site %s round %s: evaluate started (with round %s's training)",
            site.name,
            settings[K.EVALUATE_ROUND],
            settings.get(K.SERVER_ROUND),
        )
        metrics = evaluate_model(msg, site, data, cfg, int(settings[K.EVALUATE_ROUND]))
    except Exception:  # noqa: BLE001 - the training result does not depend on it
        log.exception(
            "site %s: evaluation of round %s's model failed",
            site.name,
            settings.get(K.EVALUATE_ROUND),
        )
        return {}
    return {f"{K.FOLDED_PREFIX}{k}": v for k, v in metrics.items()}


def handle(
    msg: Message,
    context: Context,
    phase: str,
    data_root: str | None = None,
    privacy: PrivacyConfig | None = None,
) -> Message:
    """Run ``phase`` ("train" or "evaluate") for the instruction ``msg``."""
    name = "unknown"
    try:
        site, data, cfg, settings, seed = prepare(msg, context, phase, data_root, privacy)
        name = site.name
        if phase == "train":
            arrays, metrics, accounting = train_update(
                msg, context, site, data, cfg, settings, seed
            )
            metrics.update(folded_evaluation(msg, site, data, cfg, settings))
            return _reply(msg, site, metrics, arrays, accounting)
        metrics = evaluate_model(msg, site, data, cfg, int(settings.get(K.SERVER_ROUND, 0)))
        return _reply(msg, site, metrics, None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a catalogued error reply
        return error_reply(msg, exc, phase, name)
