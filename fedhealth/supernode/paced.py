"""``flower-supernode`` with a configurable pull interval.

Flower 1.39's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s
whenever a pull from the SuperLink finds no message, and polls its own state every 0.5 s while it
waits for the ClientApp's reply. A site that has just replied always finds nothing (the round's
other sites are still training), so it picks up the next round's message up to 3 s after the
coordinator sent it: in a round of a few seconds that is the largest single cost left
(``benchmarks/round_overhead.py``). Flower has no option for it.

This launcher runs the unchanged ``flower-supernode`` entry point in this process after giving
that one module a ``time`` whose ``sleep`` is capped: the 3 s sleep after an empty pull at
``--pull-interval`` seconds, the 0.5 s polls of the SuperNode's own state (a reply the ClientApp
has finished, an object of it) at :data:`LOCAL_POLL`. Every sleep in that module is one of those
two polls, so capping them changes how often the SuperNode asks, never what it does. A local poll
is a lookup in this process's memory; the 0.5 s wait cost every message phase up to half a second
before the reply left the site, four times per round under SecAgg+. The patch is checked
against the module's source first: if a Flower release changes the loop, the SuperNode runs stock
and says so, rather than running a patch that no longer fits.

    python -m fedhealth.supernode.paced --pull-interval 0.5 -- <flower-supernode args>

With ``--enforce-approval`` (the site daemon always gives it) it first installs the site's app
gate (:mod:`fedhealth.supernode.approval`: only approved FABs are stored and run); that one fails
closed: if it does not fit the installed Flower, the SuperNode does not start. Runtime dependency
installation is refused then too.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import logging
import sys
import time
from types import ModuleType, SimpleNamespace
from typing import Any

from fedhealth.errors import PatchMismatch
from fedhealth.supernode.heartbeat import set_heartbeat_interval

log = logging.getLogger("fedhealth.supernode")

MODULE = "flwr.supernode.start_client_internal"
PULL = "_pull_and_store_message"
NODESTATE = "flwr.supernode.nodestate.in_memory_nodestate"
# What waiting_reply reads in NODESTATE: the message store, its lock, the retrieved flag that
# Flower's get_messages sets on what it returns
NODESTATE_EXPECTED = (
    "self.msg_store: dict[str, MessageEntry]",
    "self.lock_msg_store = RLock()",
    "is_retrieved: bool = False",
    "entry.is_retrieved = True",
)
# What the patch expects to find in MODULE: the 3 s sleep after an empty pull, and no other use of
# ``time`` than sleeping and reading clocks.
EXPECTED = ("time.sleep(3)",)
CLOCKS = ("time", "monotonic", "perf_counter")
DEFAULT_INTERVAL = 0.5
MAX_INTERVAL = 3.0  # Flower's own sleep after an empty pull: a longer cap would change nothing
PULL_SLEEP = 3.0  # Flower's sleep after a pull of the SuperLink found no message
LOCAL_SLEEP = 0.5  # Flower's sleep between polls of the SuperNode's own state
LOCAL_POLL = 0.05
"""Seconds between the SuperNode's polls of its own state (Flower: 0.5 s)."""
FIRST_RETRY = 0.1
"""Seconds before the first re-pull after a message, doubled after each empty pull until the
waits add up to one pull interval (0.1, 0.2, 0.2 s for 0.5 s), then every interval. Under SecAgg+
the next stage's message follows a reply within about a second; the extra pulls find it up to
0.4 s sooner, never later, than a flat interval (the pulls fall on the flat schedule's times and
between them)."""
SLEEPS = ("0.5", "0.5", "3")
"""Every ``time.sleep`` argument the patch expects in :data:`MODULE`, as written there (sorted):
two polls of local state, one wait after an empty pull."""


def paced_time(interval: float) -> SimpleNamespace:
    """Make a stand-in for the ``time`` module whose ``sleep`` is capped.

    ``sleep(s)`` sleeps ``min(s, LOCAL_POLL)`` for a poll of the SuperNode's own state
    (:data:`LOCAL_SLEEP`) and ``min(s, interval)`` otherwise; the wait after an empty pull of
    the SuperLink (:data:`PULL_SLEEP`) is shorter right after a message: ``after_message()``
    (called when a pull returns one) makes the next waits :data:`FIRST_RETRY`, doubling, until
    they add up to ``interval``.

    Parameters
    ----------
    interval : float
        The longest wait between pulls of the SuperLink, in seconds, in
        (0, :data:`MAX_INTERVAL`].

    Returns
    -------
    SimpleNamespace
        ``sleep`` (capped), ``after_message``, the clocks of :data:`CLOCKS` unchanged, and
        ``pull_interval``.

    Raises
    ------
    ValueError
        ``interval`` is out of range.
    """
    if not 0 < interval <= MAX_INTERVAL:
        raise ValueError(f"pull interval {interval!r}: need 0 < interval <= {MAX_INTERVAL:g} s")

    burst = [interval, interval]  # the next wait after an empty pull, the burst's time left

    def sleep(seconds: float) -> None:
        if seconds == LOCAL_SLEEP:
            cap = LOCAL_POLL
        elif seconds == PULL_SLEEP:
            cap = min(burst[0], burst[1]) if burst[1] > 1e-9 else interval
            burst[0], burst[1] = 2 * burst[0], burst[1] - cap
        else:
            cap = interval
        time.sleep(min(seconds, cap))

    def after_message() -> None:
        burst[0], burst[1] = min(FIRST_RETRY, interval), interval

    return SimpleNamespace(
        sleep=sleep,
        after_message=after_message,
        **{name: getattr(time, name) for name in CLOCKS},
        pull_interval=interval,
    )


def check_module(module: ModuleType) -> None:
    """Check that ``module`` uses ``time`` as the patch expects.

    Parameters
    ----------
    module : ModuleType
        Flower's SuperNode loop, :data:`MODULE`.

    Raises
    ------
    PatchMismatch
        ``module.time`` is not the ``time`` module, the source no longer holds
        :data:`EXPECTED`, it uses ``time`` for more than sleeping and the clocks, or its sleeps
        are not exactly :data:`SLEEPS` (one after an empty pull, two polls of local state).
    """
    if getattr(module, "time", None) is not time:
        raise PatchMismatch(f"{module.__name__}.time is not the time module")
    source = inspect.getsource(module)
    missing = [needle for needle in EXPECTED if needle not in source]
    if missing:
        raise PatchMismatch(f"{module.__name__} no longer contains {missing}")
    tree = ast.parse(source)
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "time"
    }
    sleeps = [
        node.args[0] if node.args else node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "sleep"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "time"
    ]
    unknown = sorted(used - {"sleep", *CLOCKS})
    if unknown:
        raise PatchMismatch(
            f"{module.__name__} uses time.{unknown}, which the patch does not provide"
        )
    found = tuple(sorted(ast.unparse(arg) for arg in sleeps))
    if found != SLEEPS:
        raise PatchMismatch(f"{module.__name__} sleeps for {list(found)} s, not {list(SLEEPS)}")


def pace(interval: float) -> bool:
    """Cap the SuperNode loop's sleeps: pulls at ``interval``, local polls at :data:`LOCAL_POLL`.

    Parameters
    ----------
    interval : float
        Seconds, in (0, :data:`MAX_INTERVAL`].

    Returns
    -------
    bool
        True when applied; False (and a warning) if the installed Flower does not match, and
        the SuperNode polls as stock Flower does.

    Raises
    ------
    ValueError
        ``interval`` is out of range.
    """
    module = importlib.import_module(MODULE)
    namespace = vars(module)
    if isinstance(namespace.get("time"), SimpleNamespace):  # already paced
        namespace["time"] = paced_time(interval)
        return True
    try:
        check_module(module)
    except PatchMismatch as exc:
        log.warning(
            "pull interval %.2f s not applied, the SuperNode polls as stock Flower does: %s",
            interval,
            exc,
        )
        return False
    namespace["time"] = paced_time(interval)
    return True


def push_stranded_replies() -> bool:
    """Make Flower's loop push a reply that waits while a pull finds no new message.

    Flower 1.39's loop pushes replies only after a pull that returned a message. After a
    coordinator restart a site can hold a stale reply of the dead run: the next pull brings the
    new run's message, the push stage sends (and drops) the stale reply at once, and the new
    run's reply, done a moment later, waits for a pull that never comes (the coordinator waits
    for that very reply). Wrapped here: a pull that finds nothing while a reply waits returns
    that reply's run id, so the loop goes on to push it. The reply is looked at, not taken:
    Flower's ``get_messages`` marks what it returns as retrieved, and the push stage, which asks
    again, would then wait forever (:func:`waiting_reply`).

    Returns
    -------
    bool
        True when installed (or already); False when the loop's pull is not called with
        ``state=`` as this expects, or the SuperNode's state is not the one
        :func:`waiting_reply` reads (the SuperNode then runs as stock Flower does).
    """
    module = importlib.import_module(MODULE)
    pull = getattr(module, PULL)
    if getattr(pull, "pushes_stranded_replies", False):
        return True
    if f"{PULL}(\n                state=state," not in inspect.getsource(module):
        log.warning("stranded replies not handled: %s.%s is called differently", MODULE, PULL)
        return False
    nodestate = importlib.import_module(NODESTATE)
    missing = [n for n in NODESTATE_EXPECTED if n not in inspect.getsource(nodestate)]
    if missing:
        log.warning("stranded replies not handled: %s lacks %s", NODESTATE, missing)
        return False

    def pull_or_push(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is None and (reply := waiting_reply(kwargs["state"])) is not None:
            log.info("a reply of run %s waits: pushing it", reply.metadata.run_id)
            return reply.metadata.run_id
        if run_id is not None and (after := getattr(module.time, "after_message", None)):
            after()  # paced (pace): re-pull soon once this message's reply has gone
        return run_id

    pull_or_push.pushes_stranded_replies = True  # type: ignore[attr-defined]
    setattr(module, PULL, pull_or_push)
    return True


def waiting_reply(state: Any) -> Any:
    """Return a reply waiting in the SuperNode's state to be pushed, without taking it.

    Reads Flower 1.39's ``InMemoryNodeState`` message store under its lock (checked against
    :data:`NODESTATE_EXPECTED` when :func:`push_stranded_replies` installs): an entry not yet
    retrieved whose message replies to another.

    Parameters
    ----------
    state : flwr.supernode.nodestate.InMemoryNodeState
        The SuperNode's state.

    Returns
    -------
    flwr.app.Message or None
        The first waiting reply; None when there is none or the state is of another kind.
    """
    store, lock = getattr(state, "msg_store", None), getattr(state, "lock_msg_store", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        for entry in store.values():
            if not entry.is_retrieved and entry.message.metadata.reply_to_message_id:
                return entry.message
    return None


def configure_logging() -> None:
    """Log as the site daemon reads it: every line once, Python's format, no start-up chatter.

    The root logger gets Python's ``<time> <LEVEL> <logger>: <words>`` (unless it has a handler
    already); Flower's ``flwr`` logger prints through its own handler only (propagating to the
    root's too printed each of its lines twice); alembic's plugin lines (Flower's state
    database, at every start) only from WARNING.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    logging.getLogger("flwr").propagate = False
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Pace the SuperNode loop, then run ``flower-supernode`` in this process.

    Parameters
    ----------
    argv : list of str, optional
        ``[--pull-interval S] [--enforce-approval] [--heartbeat-interval S] --
        <flower-supernode args>`` (default None: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 (``flower-supernode`` itself exits through Flower's ``flwr_exit``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedhealth.supernode.paced", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--pull-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help="most seconds between the SuperNode's pulls of the SuperLink (stock Flower: 3 s "
        f"after an empty pull; after a message from {FIRST_RETRY:g} s, doubling, until the "
        f"waits add up to this); its own state is polled every {LOCAL_POLL:g} s (Flower: 0.5 s)",
    )
    parser.add_argument(
        "--enforce-approval",
        action="store_true",
        help="run only approved apps (fails closed; the site daemon always sets it)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=None,
        help="seconds between heartbeats the SuperNode declares (Flower: 30; dead after twice "
        "this; fedhealth.supernode.heartbeat)",
    )
    parser.add_argument("--site-name", default="site", help="the site's name, for refusals")
    parser.add_argument(
        "--approved-app", action="append", default=[], metavar="SHA256", help="approved FAB hash"
    )
    parser.add_argument(
        "--trusted-publishers", default="", metavar="YAML", help="trusted publisher keys"
    )
    parser.add_argument("--apps-log", default="", metavar="JSONL", help="record of decisions")
    parser.add_argument(
        "supernode_args",
        nargs=argparse.REMAINDER,
        help="flower-supernode's own arguments, after --",
    )
    args = parser.parse_args(argv)
    rest = args.supernode_args[1:] if args.supernode_args[:1] == ["--"] else args.supernode_args
    configure_logging()
    try:
        paced = pace(args.pull_interval)
        if args.heartbeat_interval is not None:  # fails closed, unlike the pull interval
            set_heartbeat_interval(args.heartbeat_interval)
    except (ValueError, PatchMismatch) as exc:
        parser.error(str(exc))
    if paced:
        log.info("SuperNode pull interval %.2f s", args.pull_interval)
    if args.heartbeat_interval is not None:
        log.info("SuperNode heartbeat interval %g s", args.heartbeat_interval)
    if args.enforce_approval:
        _gate(parser, args, rest)
    push_stranded_replies()
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()  # exits through flwr_exit
    return 0


def _gate(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> None:
    """Install the app gate or exit: the SuperNode never runs unapproved code."""
    from pathlib import Path

    from fedhealth.errors import FedHealthError
    from fedhealth.security.apps import AppPolicy
    from fedhealth.supernode import approval

    if any(a.startswith("--allow-runtime") for a in rest):
        parser.error("runtime dependency installation stays off at sites")
    try:
        policy = AppPolicy.load(args.approved_app, args.trusted_publishers, "site config")
        approval.install(policy, args.site_name, Path(args.apps_log) if args.apps_log else None)
    except FedHealthError as exc:
        log.error("app gate not installed, the SuperNode does not start: %s", exc)
        sys.exit(f"refusing to start: {exc.describe()}")
    log.info("site %s app gate: %s", args.site_name, policy.describe())


if __name__ == "__main__":
    sys.exit(main())
