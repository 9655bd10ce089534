"""The site's app gate: the SuperNode stores (and so runs) only apps the site approved.

Flower's SuperNode loop (:data:`MODULE`) fetches the run and its FAB when a message of an unknown
run arrives (``_pull_and_store_message``); with trusted entities set, it calls ``_verify_fab``
before it stores the run, and on ``False`` it queues ``FAB_VERIFICATION_ERROR`` as the reply and
returns: no ClientApp task is created, none of the app's code runs. Flower only fills a FAB's
verifications for FABs fetched from Flower Hub, so for local FABs that check can never pass.

The gate reuses that path. It wraps ``_pull_and_store_message`` so that ``get_run`` remembers the
run (its run config may carry the publisher signature), ``get_fab`` marks the FAB for
verification, and ``trusted_entities`` is never empty; ``_verify_fab`` becomes
:meth:`Gate.verify`, which decides with the site's :class:`~fedhealth.security.apps.AppPolicy`
over the sha256 of the FAB bytes the site received, records the decision in ``apps.jsonl`` and,
on refusal, sets the error reply to :attr:`~fedhealth.errors.ErrorCode.SITE_APP_REFUSED` naming
the site. Unlike pacing, the gate fails closed: if Flower's source is not what it was written
for, :func:`install` raises and the SuperNode does not start.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.app import Error
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

from fedhealth.errors import ERROR_HELP, ErrorCode, PatchMismatch
from fedhealth.security.apps import SIGNATURE_KEY, AppPolicy, Decision, record_decision

__all__ = ["MODULE", "Gate", "check_module", "install"]

log = logging.getLogger("fedhealth.supernode")

MODULE = "flwr.supernode.start_client_internal"
PULL = "_pull_and_store_message"
VERIFY = "_verify_fab"
REPLY = "FAB_VERIFICATION_ERROR"
PULL_PARAMS = ("get_run", "get_fab", "trusted_entities")
# In _pull_and_store_message, first occurrences in this order: fetch, verify, store, task ...
PULL_STEPS = (
    "run_info = get_run(run_id)",
    "fab = get_fab(run_info.fab_hash, run_id)",
    "if trusted_entities:",
    'if not fab.verifications.get("valid_license", ""):',
    "fab_verified = _verify_fab(fab, trusted_entities)",
    "if not fab_verified:",
    "state.store_run(run_info)",
    "state.store_fab(fab)",
    "task_id = state.create_task(",
)
# ... and between "if not fab_verified:" and storing the run: the error reply, then return.
ON_REFUSAL = ("reply = Message(FAB_VERIFICATION_ERROR, reply_to=message)", "return run_id")
LOOP_CALL = "trusted_entities=trusted_entities"
MARK = "valid_license"


def check_module(module: ModuleType) -> None:
    """Check that Flower's SuperNode loop verifies FABs where the gate expects.

    Parameters
    ----------
    module : ModuleType
        :data:`MODULE`.

    Raises
    ------
    PatchMismatch
        A function or constant is missing, ``_pull_and_store_message`` lost a parameter, or its
        source no longer holds :data:`PULL_STEPS` in that order (verification before the run is
        stored and its task created).
    """
    name = module.__name__
    pull, verify = getattr(module, PULL, None), getattr(module, VERIFY, None)
    if not callable(pull) or not callable(verify):
        raise PatchMismatch(f"{name}: {PULL} or {VERIFY} is missing")
    if not isinstance(getattr(module, REPLY, None), Error):
        raise PatchMismatch(f"{name}: {REPLY} is not a flwr Error")
    params = tuple(inspect.signature(pull).parameters)
    missing = [p for p in PULL_PARAMS if p not in params]
    if missing:
        raise PatchMismatch(f"{name}.{PULL}: parameters {missing} are gone")
    if tuple(inspect.signature(verify).parameters) != ("fab", "trusted_entities"):
        raise PatchMismatch(f"{name}.{VERIFY}: signature changed")
    source = " ".join(inspect.getsource(pull).split())
    at = -1
    for step in PULL_STEPS:  # each step's first occurrence, in this order
        found = source.find(" ".join(step.split()))
        if found <= at:
            raise PatchMismatch(f"{name}.{PULL}: {step!r} missing or out of order")
        at = found
    refused = source.find("if not fab_verified:")
    stored = source.find("state.store_run(run_info)")
    for step in ON_REFUSAL:
        refused = source.find(step, refused + 1)
        if not 0 < refused < stored:
            raise PatchMismatch(f"{name}.{PULL}: {step!r} missing or out of order")
    loop = getattr(module, "start_client_internal", None)
    if not callable(loop) or LOOP_CALL not in inspect.getsource(loop):
        raise PatchMismatch(f"{name}.start_client_internal no longer passes {LOOP_CALL}")


class Gate:
    """The site's decision on each run's app, installed into Flower's SuperNode loop.

    Parameters
    ----------
    module : ModuleType
        Flower's SuperNode loop, already checked by :func:`check_module`.
    policy : AppPolicy
        What the site accepts.
    site : str
        The site's name, for the log, the record and the error reply.
    record : Path, optional
        ``apps.jsonl``; None: decisions are only logged.
    """

    def __init__(
        self, module: ModuleType, policy: AppPolicy, site: str, record: Path | None = None
    ) -> None:
        self.module = module
        self.policy = policy
        self.site = site
        self.record = record
        self.original: Callable[..., Any] = getattr(module, PULL)
        self.flower_verify: Callable[..., Any] = getattr(module, VERIFY)
        self.flower_reply: Error = getattr(module, REPLY)
        self.runs: dict[int, Run] = {}
        self.pending: int | None = None
        self.decided: dict[int, Decision] = {}

    def pull(self, *args: Any, **kwargs: Any) -> Any:
        """Flower's ``_pull_and_store_message`` with the gate's ``get_run``/``get_fab``."""
        bound = inspect.signature(self.original).bind(*args, **kwargs)
        get_run: Callable[[int], Run] = bound.arguments["get_run"]
        get_fab: Callable[[str, int], Fab] = bound.arguments["get_fab"]

        def gated_run(run_id: int) -> Run:
            run = get_run(run_id)
            self.runs[run_id] = run
            return run

        def gated_fab(fab_hash: str, run_id: int) -> Fab:
            fab = get_fab(fab_hash, run_id)
            self.pending = run_id
            return Fab(fab.hash_str, fab.content, {MARK: "fedhealth app gate"})

        bound.arguments["get_run"] = gated_run
        bound.arguments["get_fab"] = gated_fab
        bound.arguments["trusted_entities"] = {"fedhealth": "app gate"}  # never empty
        return self.original(*bound.args, **bound.kwargs)

    def verify(self, fab: Fab, trusted_entities: dict[str, str]) -> bool:
        """Decide on the FAB of the run being fetched (Flower's ``_verify_fab``).

        Parameters
        ----------
        fab : Fab
            The FAB as received; its hash is computed from its content.
        trusted_entities : dict[str, str]
            Ignored (the gate's policy decides).

        Returns
        -------
        bool
            True: Flower stores the run and runs the app; False: Flower replies with the error
            the gate has just set and runs nothing.
        """
        del trusted_entities
        run_id, self.pending = self.pending, None
        run = self.runs.pop(run_id, None) if run_id is not None else None
        signature = str(run.override_config.get(SIGNATURE_KEY, "")) if run else ""
        decision = self.policy.decide(fab.content, signature)
        if run is None:
            decision = Decision(False, decision.sha256, "FAB arrived without its run")
        elif decision.approved and run.fab_hash != decision.sha256:
            decision = Decision(
                False, decision.sha256, f"the run states FAB sha256 {run.fab_hash[:16]}"
            )
        self._report(run_id, run, decision)
        if not decision.approved:
            setattr(
                self.module,
                REPLY,
                Error(
                    int(ErrorCode.SITE_APP_REFUSED),
                    f"site {self.site}: {ERROR_HELP[ErrorCode.SITE_APP_REFUSED]} "
                    f"(FAB sha256 {decision.sha256[:16]})",
                ),
            )
        return decision.approved

    def _report(self, run_id: int | None, run: Run | None, decision: Decision) -> None:
        first = run_id is None or run_id not in self.decided
        if run_id is not None:
            self.decided[run_id] = decision
        verdict = "approved" if decision.approved else "refused"
        if decision.approved:  # every message of the run is checked: said once per run
            log.log(
                logging.INFO if first else logging.DEBUG,
                "site %s: run %s app approved (FAB sha256 %s, %s)",
                self.site,
                run_id,
                decision.sha256,
                decision.reason,
            )
        else:
            log.error(
                "site %s: APP REFUSED for run %s before any of its code ran: FAB sha256 %s "
                "(%s); error E%04d sent to the coordinator",
                self.site,
                run_id,
                decision.sha256,
                decision.reason,
                int(ErrorCode.SITE_APP_REFUSED),
            )
        if self.record is not None and first:
            record_decision(
                self.record,
                {
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "site": self.site,
                    "run_id": run_id,
                    "sha256": decision.sha256,
                    "fab_id": run.fab_id if run else "",
                    "fab_version": run.fab_version if run else "",
                    "decision": verdict,
                    "reason": decision.reason,
                },
            )


def install(policy: AppPolicy, site: str, record: Path | None = None) -> Gate:
    """Check Flower's SuperNode loop and install the gate into it.

    Parameters
    ----------
    policy : AppPolicy
        What the site accepts (an empty policy refuses every app).
    site : str
        The site's name.
    record : Path, optional
        ``apps.jsonl`` (default None: log only).

    Returns
    -------
    Gate
        The installed gate.

    Raises
    ------
    PatchMismatch
        The installed Flower differs (:func:`check_module`): the SuperNode must not start.
    """
    module = importlib.import_module(MODULE)
    current = getattr(module, PULL, None)
    previous = getattr(current, "__self__", None)
    if isinstance(previous, Gate):  # installed before: put Flower's own back first
        setattr(module, PULL, previous.original)
        setattr(module, VERIFY, previous.flower_verify)
        setattr(module, REPLY, previous.flower_reply)
    check_module(module)
    gate = Gate(module, policy, site, record)
    setattr(module, PULL, gate.pull)
    setattr(module, VERIFY, gate.verify)
    return gate
