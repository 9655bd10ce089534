"""The site's budget policy: plan the noise to fit the cap, and refuse past it (hard stop).

Before each round's training the site (1) plans, once per run, the smallest noise multiplier
that keeps its epsilon within its cap for all the run's remaining rounds, given everything its
ledger says it has already spent; (2) computes the epsilon this round would bring it to and
refuses if that exceeds the cap; (3) records the round in its ledger, durably, before any
training happens. All three happen inside one exclusive ledger transaction
(:meth:`~fedhealth.privacy.ledger.PrivacyLedger.exclusive`): a run charging at the same time in
another process waits, then re-reads the history this one recorded, and is refused if it no
longer fits. A refusal rolls the transaction back: nothing is charged, not even the plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fedhealth.errors import BudgetExhausted
from fedhealth.privacy.accounting import epsilon, plan_noise
from fedhealth.privacy.ledger import Entry, Plan, PrivacyLedger
from fedhealth.privacy.policy import SitePolicy, refuse

log = logging.getLogger("fedhealth.privacy")


@dataclass(frozen=True)
class SiteBudget:
    """A site's own cap and where its ledger lives (never set by the coordinator).

    Parameters
    ----------
    epsilon_cap : float
        The most epsilon the site will ever spend, over all runs.
    delta : float
        The site's delta, in (0, 1).
    ledger_path : Path
        The site's ``ledger.sqlite``.
    """

    epsilon_cap: float
    delta: float
    ledger_path: Path


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator asks of the site this round, in DP terms.

    Parameters
    ----------
    run : str
        The run's key.
    server_round : int
        The server round (1-based).
    rounds_total : int
        Rounds in the run.
    sample_rate : float
        Poisson sampling rate of a record, in (0, 1] (1 / batches per epoch).
    steps : int
        DP-SGD steps this round.
    max_grad_norm : float
        Per-record L2 clipping bound.
    accountant : str
        ``"rdp"`` or ``"prv"``.
    fixed_noise : float, optional
        A noise multiplier the run fixes (default 0.0: the site plans its own).
    """

    run: str
    server_round: int
    rounds_total: int
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    fixed_noise: float = 0.0


def charge_round(
    ledger: PrivacyLedger,
    budget: SiteBudget,
    req: RoundRequest,
    fingerprint: str,
    site: str,
    model_sha256: str = "",
    policy: SitePolicy | None = None,
) -> Entry:
    """Plan (once per run), check the cap, and record the round before any training.

    A round asked again with the same global model (a coordinator that resumed a run after a
    crash, or one that tries another seed) is a retry: the site resends the update it stored
    when it first released it (:mod:`fedhealth.clientapp.releases`), which costs nothing more;
    the ledger keeps its one entry for it.

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's open ledger.
    budget : SiteBudget
        The site's cap and delta.
    req : RoundRequest
        The round asked for.
    fingerprint : str
        The dataset's fingerprint (recorded with the entry).
    site : str
        The site's name, for the log and errors.
    model_sha256 : str, optional
        sha256 of the incoming global model (default ``""``: no replay detection).
    policy : SitePolicy, optional
        The site's policy (default None: the cap only): its ``max_rounds_per_run``,
        ``max_epsilon_per_run`` (the run's own phases; the plan's noise is raised to fit it)
        and ``max_noise_multiplier`` (on the planned or fixed noise) are checked in the same
        transaction.

    Returns
    -------
    Entry
        The recorded entry (or, for a replay, the one recorded before).

    Raises
    ------
    BudgetExhausted
        The run's remaining rounds cannot fit in the cap at any noise level
        (:func:`fedhealth.privacy.accounting.plan_noise`), or this round would take epsilon
        past the cap; nothing is recorded.
    PolicyRefused
        A limit of ``policy`` would be broken; nothing is recorded.
    LedgerError
        The ledger could not be locked in time, failed its checks, or could not record.
    """
    with ledger.exclusive():  # check and write are one transaction across processes
        if model_sha256:
            prior = ledger.release(req.run, req.server_round, model_sha256)
            if prior is not None:
                log.info(
                    "site %s: round %d of run %s asked again with the same global model: "
                    "no new privacy spend (epsilon stays %.3f)",
                    site,
                    req.server_round,
                    req.run,
                    ledger.entries[-1].epsilon_after,
                )
                return prior
        history = ledger.history()
        spent = epsilon(history, budget.delta, req.accountant)
        limits = policy or SitePolicy(max_rounds_per_run=0, max_noise_multiplier=float("inf"))
        ran = [
            (e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries if e.run == req.run
        ]
        if limits.max_rounds_per_run and len(ran) >= limits.max_rounds_per_run:
            refuse(
                site,
                "max_rounds_per_run",
                f"run {req.run} has trained {len(ran)} round(s) here; this site allows "
                f"{limits.max_rounds_per_run} per run",
            )
        plan = ledger.plan(req.run)
        if plan is None:
            rounds_left = max(1, req.rounds_total - req.server_round + 1)
            planned_steps = req.steps * rounds_left
            sigma = req.fixed_noise or plan_noise(
                history,
                req.sample_rate,
                planned_steps,
                budget.epsilon_cap,
                budget.delta,
                req.accountant,
            )
            if sigma is not None and limits.max_epsilon_per_run and not req.fixed_noise:
                for_run = plan_noise(  # this run alone within the site's per-run limit
                    [],
                    req.sample_rate,
                    planned_steps,
                    limits.max_epsilon_per_run,
                    budget.delta,
                    req.accountant,
                )
                sigma = None if for_run is None else max(sigma, for_run)
            if sigma is None:
                raise BudgetExhausted(
                    f"site {site}: {spent:.3f} of epsilon cap {budget.epsilon_cap} spent; "
                    f"{rounds_left} more round(s) of {req.steps} steps cannot fit at any noise "
                    "level"
                )
            if sigma > limits.max_noise_multiplier:
                refuse(
                    site,
                    "max_noise_multiplier",
                    f"run {req.run} needs noise multiplier {sigma:.3f} to fit {rounds_left} "
                    f"round(s) in what is left of the budget; this site's ceiling is "
                    f"{limits.max_noise_multiplier:g} (the update would be mostly noise)",
                )
            planned = epsilon(
                [*history, (sigma, req.sample_rate, planned_steps)], budget.delta, req.accountant
            )
            plan = Plan(req.run, sigma, req.sample_rate, req.steps, rounds_left, planned)
            ledger.save_plan(plan)
            log.info(
                "site %s: privacy plan for run %s: noise multiplier %.3f, sample rate %.4f, "
                "%d rounds x %d steps; epsilon %.3f spent before, %.3f planned after, cap %.3f "
                "(delta %.1e, %s accountant)",
                site,
                req.run,
                sigma,
                req.sample_rate,
                rounds_left,
                req.steps,
                spent,
                planned,
                budget.epsilon_cap,
                budget.delta,
                req.accountant,
            )
        phase = (plan.noise_multiplier, req.sample_rate, req.steps)
        would = epsilon([*history, phase], budget.delta, req.accountant)
        if would > budget.epsilon_cap:
            raise BudgetExhausted(
                f"site {site}: round {req.server_round} would bring epsilon to {would:.3f}, over "
                f"the cap {budget.epsilon_cap} (spent {spent:.3f}); refusing to train"
            )
        if limits.max_epsilon_per_run:
            for_run = epsilon([*ran, phase], budget.delta, req.accountant)
            if for_run > limits.max_epsilon_per_run:
                refuse(
                    site,
                    "max_epsilon_per_run",
                    f"round {req.server_round} would bring run {req.run}'s epsilon to "
                    f"{for_run:.3f}; this site allows {limits.max_epsilon_per_run:g} per run",
                )
        return ledger.record(
            req.run,
            req.server_round,
            phase,
            req.max_grad_norm,
            req.accountant,
            budget.delta,
            budget.epsilon_cap,
            fingerprint,
            model_sha256,
        )
