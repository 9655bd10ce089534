"""What a site does with one instruction from the coordinator: train or evaluate, then reply.

Only parameters and aggregate metrics leave the site. Errors are logged here in full and replied
with a catalogue code and its fixed public text (:data:`fedhealth.errors.SITE_ERROR_CODES`): no
file names, no patient ids, no stack traces cross the network. What the site does is also
reported to its daemon as site events (:mod:`fedhealth.clientapp.events`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sized
from typing import NamedTuple

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fedhealth.clientapp.evaluation import Metrics, evaluate_model, folded_evaluation
from fedhealth.clientapp.events import RoundStarted, Trained
from fedhealth.clientapp.global_model import check_outgoing, model_from, received
from fedhealth.clientapp.instruction import Instruction, Site, derive_seed
from fedhealth.clientapp.local_round import charge, train_once
from fedhealth.clientapp.outputs import released
from fedhealth.clientapp.releases import ReleaseStore, resend
from fedhealth.clientapp.sitelog import emit, emit_failure
from fedhealth.config import Config, PrivacyConfig, from_site_settings
from fedhealth.data.loading import SiteData, load_site, require_patient_ids
from fedhealth.data.sites import check_declared
from fedhealth.errors import ConfigError
from fedhealth.models import DP_READY
from fedhealth.privacy.budget import RoundRequest
from fedhealth.privacy.resources import check_resources
from fedhealth.protocol import keys as K
from fedhealth.protocol.packing import pack, packed_dtype
from fedhealth.protocol.replies import error_reply, node_site_name
from fedhealth.training import DPSettings, seed_everything
from fedhealth.training.scoring import train_loader

__all__ = [
    "Prepared",
    "Site",
    "Update",
    "evaluate_model",
    "folded_evaluation",
    "handle",
    "prepare",
    "train_update",
]

log = logging.getLogger("fedhealth.site")

Accounting = dict[str, ConfigRecordValues]  # the reply's ``site`` record, beside the name


class Prepared(NamedTuple):
    """Everything a phase needs, from :func:`prepare`.

    Parameters
    ----------
    site : Site
        Who the site is.
    data : SiteData
        Its checked datalists.
    cfg : Config
        The run config the instruction carries.
    instruction : Instruction
        The round's keys.
    seed : int
        This phase's seed (:func:`~fedhealth.clientapp.instruction.derive_seed`).
    """

    site: Site
    data: SiteData
    cfg: Config
    instruction: Instruction
    seed: int


class Update(NamedTuple):
    """One round's training result, as sent.

    Parameters
    ----------
    arrays : ArrayRecord
        The trained model, validated, in the form the global model came in (packed or not).
    metrics : dict of str to (int or float)
        What the reply releases (:func:`fedhealth.clientapp.outputs.released`): with DP the
        epsilon spent, its cap, delta and clip norm and the ledger's standing; a plain reply's
        example count; whatever else the site's ``policy.release`` lists.
    accounting : dict of str to ConfigRecordValues
        With DP, the accountant, the site's ``privacy-unit`` (and its DP history when its
        policy releases it); without DP, ``dp-off-by-site``
        (:meth:`~fedhealth.clientapp.instruction.Site.reply_fields`).
    loss : float
        The round's training loss (inside the secure sum, weighted; never sent in plain
        unless released).
    examples : int
        The site's example count (the secure sum's weight).
    """

    arrays: ArrayRecord
    metrics: Metrics
    accounting: Accounting
    loss: float
    examples: int


def _reply(
    msg: Message,
    site: Site,
    metrics: Metrics,
    arrays: ArrayRecord | None,
    about: Accounting | None = None,
) -> Message:
    record: dict[str, ConfigRecordValues] = {K.SITE_NAME: site.name, **(about or {})}
    content = RecordDict(
        {
            K.METRICS: MetricRecord(dict[str, MetricRecordValues](metrics)),
            K.SITE: ConfigRecord(record),
        }
    )
    if arrays is not None:
        content[K.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def train_update(
    msg: Message,
    context: Context,
    site: Site,
    data: SiteData,
    cfg: Config,
    instruction: Instruction,
    seed: int,
    secure: bool = False,
) -> Update:
    """Train locally (with DP-SGD when the run asks for it) for one instruction.

    With DP the round is first charged to the site's ledger (:func:`fedhealth.privacy.budget.
    charge_round`: plan, cap check, durable record), and Opacus must then run exactly the
    phase the ledger recorded. The update is validated before it is returned: the record
    checked is the record sent.

    Parameters
    ----------
    msg : Message
        The instruction, carrying the global model.
    context : Context
        Flower's context (its run id names the run when the instruction has no run key).
    site, data, cfg, instruction, seed
        From :func:`prepare`.
    secure : bool, optional
        The update goes into a secure sum (default False: a plain train reply); decides what
        the reply releases (:func:`fedhealth.clientapp.outputs.released`).

    Returns
    -------
    Update
        The update as sent, its metrics, and the DP accounting for the reply.

    Raises
    ------
    BudgetExhausted
        The round does not fit in the site's budget (nothing is trained or recorded).
    LedgerError
        The ledger is unreadable, or Opacus ran another phase than the ledger recorded.
    ConfigError
        DP is on but the site has no budget, or the global model does not fit the config.
    """
    loader = train_loader(data.train, cfg, seed)
    if not isinstance(loader.dataset, Sized):
        raise ConfigError(f"site {site.name}: the training set has no length")
    num_examples = len(loader.dataset)
    model, incoming = model_from(msg, cfg), received(msg)  # not fitting: refused, no charge
    run_key = instruction.run_key or str(context.run_id)
    guard = (  # one release per (run, round): a retry that arrives mid-training waits, resends
        ReleaseStore(site.budget.ledger_path).lock(run_key, instruction.server_round)
        if cfg.privacy.enabled and site.budget is not None
        else contextlib.nullcontext()
    )
    with guard:
        dp, entry, privacy, accounting, stored = None, None, Metrics(), Accounting(), None
        if cfg.privacy.enabled:
            budget = site.budget
            if budget is None:
                raise ConfigError(f"site {site.name}: DP is on but the site has no ledger/budget")
            sample_rate, steps = 1.0 / len(loader), cfg.train.local_epochs * len(loader)
            request = RoundRequest(
                run=run_key,
                server_round=instruction.server_round,
                rounds_total=cfg.rounds,
                sample_rate=sample_rate,
                steps=steps,
                max_grad_norm=cfg.privacy.max_grad_norm,
                accountant=cfg.privacy.accountant,
                fixed_noise=cfg.privacy.noise_multiplier,
            )
            entry, history, standing = charge(msg, site.name, budget, data, request, site.policy)
            accounting = {
                K.ACCOUNTANT: cfg.privacy.accountant,
                K.HISTORY_NOISE: [h[0] for h in history],
                K.HISTORY_RATE: [h[1] for h in history],
                K.HISTORY_STEPS: [h[2] for h in history],
            }
            dp = DPSettings(
                entry.noise_multiplier,
                cfg.privacy.max_grad_norm,
                accountant=cfg.privacy.accountant,
                grad_sample_mode=DP_READY[cfg.model.name],
                noise_seed=site.round_noise_seed(instruction.settings, data.fingerprint),
            )
            releases = ReleaseStore(budget.ledger_path)
            stored = releases.load(request.run, request.server_round, entry)
            privacy = {
                K.EPSILON: entry.epsilon_after,
                K.EPSILON_CAP: budget.epsilon_cap,
                K.DELTA: budget.delta,
                K.NOISE_MULTIPLIER: entry.noise_multiplier,
                K.SAMPLE_RATE: sample_rate,
                K.DP_STEPS: steps,
                K.MAX_GRAD_NORM: cfg.privacy.max_grad_norm,
                **standing,  # the ledger's length and head: the coordinator checks it only grows
            }
        if stored is not None:  # released before: the same bytes again, nothing new leaves
            state, done = resend(stored, model, site.name, instruction.server_round)
        else:
            state, done = train_once(
                model, loader, cfg, instruction, dp, entry, site.name, site.device
            )
            if entry is not None:  # stored before it is sent: a retry resends it
                releases.save(request.run, request.server_round, entry, state, done)
    # the update goes back in the form and wire dtype the global model came in; an update for
    # a secure sum stays float32 (quantised to the sum's own fixed-point field, never rounded
    # to 16 bits first). Rounding comes after Opacus's noise: post-processing.
    wire = packed_dtype(incoming)
    arrays = ArrayRecord(state) if wire is None else pack(state, "float32" if secure else wire)
    check_outgoing(arrays, msg, site.name)
    trained = Trained(
        site=site.name,
        round=instruction.server_round,
        loss=done[K.LOSS],
        epsilon=None if entry is None else entry.epsilon_after,
        epsilon_cap=None if site.budget is None or entry is None else site.budget.epsilon_cap,
    )
    emit(
        log,
        trained,
        "site %s round %d: trained, loss %.4f%s",
        site.name,
        instruction.server_round,
        done[K.LOSS],
        "" if entry is None else f", epsilon {trained.epsilon:.3f} of {trained.epsilon_cap}",
    )
    measured: Metrics = {**done, K.NUM_EXAMPLES: num_examples, **privacy}
    about = {**accounting, **site.reply_fields(cfg.privacy.enabled)}
    metrics, about = released(measured, about, site.policy, secure=secure)
    return Update(arrays, metrics, about, float(done[K.LOSS]), num_examples)


def prepare(
    msg: Message,
    context: Context,
    phase: str,
    site_dirs: tuple[str, ...] | None,
    privacy: PrivacyConfig | None,
    secure: bool = False,
    device: str = "auto",
) -> Prepared:
    """Read who the site is, its data, the instruction's run config, and seed this phase.

    Parameters
    ----------
    msg : Message
        The instruction.
    context : Context
        Flower's context (the SuperNode's node config).
    phase : str
        ``"train"`` or ``"evaluate"``.
    site_dirs : tuple of str, optional
        Simulation only: every virtual site's folder, by partition id (default None: the
        node config names the site's data directory).
    privacy : PrivacyConfig or None
        Simulation only: the sites' budgets.
    secure : bool, optional
        The instruction is secure aggregation's mask stage (default False: a plain ``train``,
        refused when the site's policy requires secure aggregation).

    Returns
    -------
    Prepared
        Site, data, config, instruction and seed.

    Raises
    ------
    DPRequired
        Training without DP asked of a site whose policy requires DP (before its data is read).
    PolicyRefused
        The instruction breaks another limit of the site's policy
        (:meth:`fedhealth.privacy.policy.SitePolicy.check_instruction`; before its data is read).
        The instruction's model, patch, grid, batches or threads exceed the site's compute
        limits (:func:`fedhealth.privacy.resources.check_resources`; training and evaluation).
    PrivacyUnitMissing
        DP training whose privacy unit is the patient, on a datalist whose training entries
        lack patient ids (before anything is trained or charged).
    """
    site = Site.from_context(context, site_dirs, privacy, device)
    instruction = Instruction.from_message(msg)
    cfg = from_site_settings(instruction.settings)
    server_round = instruction.server_round
    emit(
        log,
        RoundStarted(site=site.name, round=server_round, phase=phase),
        "site %s round %d: %s started",
        site.name,
        server_round,
        phase,
    )
    train_phase, dp = phase == "train", cfg.privacy.enabled
    if train_phase:  # the site's policy, before any data is read or budget charged
        site.policy.check_instruction(
            site.name,
            dp=dp,
            secure=secure,
            rounds=cfg.rounds,
            max_grad_norm=cfg.privacy.max_grad_norm,
            local_epochs=cfg.train.local_epochs,
            lr=cfg.train.lr,
            model=cfg.model.name,
            noise_multiplier=cfg.privacy.noise_multiplier,
        )
    check_resources(site.policy, site.name, cfg)  # both phases: model, patch, grid, batches
    data = load_site(site.data_dir / "dataset.json")
    check_declared(data, cfg, site.name)
    if train_phase and dp:
        require_patient_ids(data, site.privacy_unit, site.name)
    elif train_phase:
        log.warning(
            "site %s round %d: training WITHOUT DP (site.yaml policy.require_dp: false)",
            site.name,
            server_round,
        )
    seed = derive_seed(cfg.seed, site.name, server_round, phase)
    seed_everything(seed, cfg.train.num_threads)
    return Prepared(site, data, cfg, instruction, seed)


def handle(
    msg: Message,
    context: Context,
    phase: str,
    site_dirs: tuple[str, ...] | None = None,
    privacy: PrivacyConfig | None = None,
    device: str = "auto",
) -> Message:
    """Run ``phase`` for the instruction ``msg`` and build the reply.

    Parameters
    ----------
    msg : Message
        The instruction.
    context : Context
        Flower's context.
    phase : str
        ``"train"`` or ``"evaluate"``.
    site_dirs : tuple of str, optional
        Simulation only: every virtual site's folder, by partition id (default None: the
        node config names the site's data directory).
    privacy : PrivacyConfig, optional
        Simulation only: the sites' budgets (default None).

    Returns
    -------
    Message
        The reply: metrics (and the update, for training), or a catalogued error that names
        no file, patient or stack frame.
    """
    name, server_round = node_site_name(context.node_config, site_dirs), None
    try:
        site, data, cfg, instruction, seed = prepare(
            msg, context, phase, site_dirs, privacy, device=device
        )
        name, server_round = site.name, instruction.server_round
        if phase == "train":
            update = train_update(msg, context, site, data, cfg, instruction, seed)
            metrics = {**update.metrics, **folded_evaluation(msg, site, data, cfg, instruction)}
            return _reply(msg, site, metrics, update.arrays, update.accounting)
        metrics = evaluate_model(msg, site, data, cfg, server_round)
        return _reply(msg, site, metrics, None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a catalogued error reply
        emit_failure(log, exc, site=name, server_round=server_round, phase=phase)
        return error_reply(msg, exc, phase, name)
