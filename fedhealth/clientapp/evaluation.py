"""Evaluation at a site: the global model on the site's test cases, whole volumes.

An evaluation rides with the next round's train instruction when the coordinator folds it
(``evaluate-round``); otherwise it is its own instruction (:func:`fedhealth.clientapp.handlers.
handle` with phase ``"evaluate"``).
"""

from __future__ import annotations

import logging

from flwr.app import Message

from fedhealth.clientapp.events import Evaluated, RoundStarted
from fedhealth.clientapp.global_model import model_from
from fedhealth.clientapp.instruction import Instruction, Site, derive_seed
from fedhealth.clientapp.sitelog import emit, emit_failure
from fedhealth.config import Config
from fedhealth.data.loading import SiteData
from fedhealth.privacy.policy import refuse
from fedhealth.protocol import keys as K
from fedhealth.training import seed_everything
from fedhealth.training.scoring import evaluate_items

log = logging.getLogger("fedhealth.site")

Metrics = dict[str, int | float]


def evaluate_model(
    msg: Message, site: Site, data: SiteData, cfg: Config, server_round: int
) -> Metrics:
    """Evaluate the global model in ``msg`` on the site's labelled test cases (whole volumes).

    Parameters
    ----------
    msg : Message
        The instruction carrying the global model.
    site, data, cfg
        From :func:`prepare`.
    server_round : int
        The round whose model this is; seeds the evaluation.

    Returns
    -------
    dict of str to (int or float)
        ``dice`` (mean over foreground classes, in [0, 1]), ``dice-<k>`` per foreground class
        ``k``, ``loss`` and ``num-examples`` (test volumes); only ``num-examples`` 0 when the
        site has no labelled test case (it reports no Dice).

    Raises
    ------
    PolicyRefused
        The site's ``policy.release`` lacks ``evaluation`` (reply 1007 ``[policy: release]``):
        the metrics of any model the coordinator sends are un-noised statistics of the site's
        test cases, so a site may withhold them; no image is read or evaluated then.
    """
    if not site.policy.releases("evaluation"):
        refuse(site.name, "release", f"round {server_round}: evaluation is not in policy.release")
    if not data.test:
        log.info("site %s round %d: no labelled test case, no Dice", site.name, server_round)
        return {K.NUM_EXAMPLES: 0}
    seed = derive_seed(cfg.seed, site.name, server_round, "evaluate")
    seed_everything(seed, cfg.train.num_threads)
    model = model_from(msg, cfg)
    ev = evaluate_items(model, data.test, cfg, seed, site.device)
    emit(
        log,
        Evaluated(site=site.name, round=server_round, dice=ev.dice, loss=ev.loss),
        "site %s round %d: dice %.4f",
        site.name,
        server_round,
        ev.dice,
    )
    per_class = {K.dice_of_class(k): d for k, d in enumerate(ev.dice_per_class, start=1)}
    return {K.DICE: ev.dice, **per_class, K.LOSS: ev.loss, K.NUM_EXAMPLES: ev.num_examples}


def folded_evaluation(
    msg: Message, site: Site, data: SiteData, cfg: Config, instruction: Instruction
) -> Metrics:
    """Evaluate the received global model after training, when the instruction asks for it.

    The evaluation runs after training (so training's random state is the same as without
    it) and its results ride along in the train reply as ``eval-*`` metrics.

    Parameters
    ----------
    msg : Message
        The train instruction (its global model is the one evaluated).
    site, data, cfg, instruction
        From :func:`prepare`.

    Returns
    -------
    dict of str to (int or float)
        :func:`evaluate_model`'s metrics, prefixed ``eval-``; empty when the instruction has
        no ``evaluate-round`` or the evaluation failed (logged: the update is still sent);
        only ``eval-withheld`` = 1 when the site's ``policy.release`` lacks ``evaluation``
        (nothing is evaluated; the coordinator counts no failure).
    """
    if instruction.evaluate_round is None:
        return {}
    if not site.policy.releases("evaluation"):
        return {f"{K.FOLDED_PREFIX}{K.EVALUATION_WITHHELD}": 1}
    evaluate_round = instruction.evaluate_round
    try:
        emit(
            log,
            RoundStarted(site=site.name, round=evaluate_round, phase="evaluate"),
            "site %s round %d: evaluate started (with round %d's training)",
            site.name,
            evaluate_round,
            instruction.server_round,
        )
        metrics = evaluate_model(msg, site, data, cfg, evaluate_round)
    except Exception as exc:  # noqa: BLE001 - the training result does not depend on it
        log.exception("site %s: evaluation of round %d's model failed", site.name, evaluate_round)
        emit_failure(log, exc, site=site.name, server_round=evaluate_round, phase="evaluate")
        return {}
    return {f"{K.FOLDED_PREFIX}{k}": v for k, v in metrics.items()}
