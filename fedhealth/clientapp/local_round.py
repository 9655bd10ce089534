"""One training round at a site: charged in the ledger first, then trained once.

Used by :func:`fedhealth.clientapp.handlers.train_update`.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Message
from torch.utils.data import DataLoader

from fedhealth.clientapp.evaluation import Metrics
from fedhealth.clientapp.events import BudgetRefused
from fedhealth.clientapp.global_model import received
from fedhealth.clientapp.instruction import Instruction, model_digest
from fedhealth.clientapp.sitelog import emit
from fedhealth.config import Config
from fedhealth.data.loading import SiteData
from fedhealth.errors import BudgetExhausted, LedgerError
from fedhealth.privacy.budget import RoundRequest, SiteBudget, charge_round
from fedhealth.privacy.ledger import Entry, PrivacyLedger
from fedhealth.privacy.policy import SitePolicy
from fedhealth.privacy.records import tag
from fedhealth.protocol import keys as K
from fedhealth.training import DPSettings, train
from fedhealth.training.device import resolve_device

__all__ = ["charge", "train_once"]

log = logging.getLogger("fedhealth.site")


def charge(
    msg: Message,
    site: str,
    budget: SiteBudget,
    data: SiteData,
    request: RoundRequest,
    policy: SitePolicy | None = None,
) -> tuple[Entry, list[tuple[float, float, int]], Metrics]:
    """Charge the round before training, in one exclusive ledger transaction.

    Parameters
    ----------
    msg : Message
        The instruction (its global model's sha256 identifies a retried round).
    site : str
        The site's name.
    budget : SiteBudget
        The site's cap, delta and ledger.
    data : SiteData
        The site's data (its fingerprint is recorded).
    request : RoundRequest
        The round asked for.
    policy : SitePolicy, optional
        The site's policy, whose per-run limits and noise ceiling are checked in the same
        transaction (default None: the cap only).

    Returns
    -------
    tuple
        The entry that charges the round (the earlier one for a retried round), the ledger's
        history, and its standing (:data:`~fedhealth.protocol.keys.LEDGER_METRICS`).

    Raises
    ------
    BudgetExhausted
        Over the cap (a BudgetRefused site event is emitted); nothing recorded.
    PolicyRefused
        Over a per-run limit or the noise ceiling of ``policy``; nothing recorded.
    """
    with PrivacyLedger(budget.ledger_path, site) as ledger:
        try:
            entry = charge_round(
                ledger,
                budget,
                request,
                data.fingerprint,
                site,
                model_digest(received(msg)),
                policy,
            )
        except BudgetExhausted as exc:
            refused = BudgetRefused(
                site=site,
                round=request.server_round,
                epsilon=ledger.spent(budget.delta, request.accountant),
                epsilon_cap=budget.epsilon_cap,
            )
            emit(log, refused, "%s", exc, level=logging.WARNING)
            raise
        head = ledger.head()  # as of the charge's transaction
        standing: Metrics = {
            K.LEDGER_ENTRIES: head.entries,
            K.LEDGER_HEAD: tag(head.hash),
            K.LEDGER_HEAD_PREV: tag(head.prev_hash),
        }
        return entry, ledger.history(), standing


def train_once(
    model: torch.nn.Module,
    loader: DataLoader[dict[str, torch.Tensor]],
    cfg: Config,
    instruction: Instruction,
    dp: DPSettings | None,
    entry: Entry | None,
    site: str,
    device: str = "auto",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the round once and check that Opacus ran the phase the ledger charged.

    Parameters
    ----------
    model : Module
        The global model, trained in place.
    loader : iterable
        The site's training loader.
    cfg : Config
        The run's config (epochs, learning rate and its decay, weight decay).
    instruction : Instruction
        The round and the proximal term.
    dp : DPSettings or None
        DP-SGD settings; None trains without DP.
    entry : Entry or None
        The ledger entry that charged the round (None without DP).
    site : str
        The site's name, for errors.
    device : str, default "auto"
        The site's own device setting (:func:`fedhealth.training.device.resolve_device`).

    Returns
    -------
    tuple of (dict of str to Tensor, dict of str to float)
        The trained state dict, and ``loss``, ``steps``, ``train-seconds``.

    Raises
    ------
    LedgerError
        Opacus ran another phase than the ledger recorded (nothing is sent).
    """
    started = time.perf_counter()
    lr = cfg.train.lr * cfg.train.lr_decay ** max(0, instruction.server_round - 1)
    result = train(
        model,
        loader,
        cfg.train.local_epochs,
        lr,
        weight_decay=cfg.train.weight_decay,
        proximal_mu=instruction.proximal_mu,
        dp=dp,
        device=resolve_device(device, f"site {site} device"),
    )
    if entry is not None and list(result.history) != [entry.phase]:
        raise LedgerError(
            f"site {site}: Opacus ran {result.history}, the ledger recorded "
            f"{entry.phase}: refusing to send the update"
        )
    done = {
        K.LOSS: result.loss,
        K.STEPS: float(result.steps),
        K.TRAIN_SECONDS: time.perf_counter() - started,
    }
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, done
