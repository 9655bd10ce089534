"""One ClientApp task in a warm child: Flower's ``run_clientapp``, pulling with a short backoff.

The targets :class:`fedhealth.supernode.warm.WarmExecutor` runs in each forked child.
"""

from __future__ import annotations

import functools
from typing import TypedDict

from flwr.supercore.constant import PULL_MAX_TIME
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.superexec.executor import ExecutionSpec
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime import run_clientapp as run_clientapp_module
from flwr.supernode.runtime.run_clientapp import run_clientapp

from fedhealth.errors import PatchMismatch


# Flower's SuperNode creates a ClientApp task as soon as a message's header arrives, before the
# message's objects are downloaded, so a child that starts at once finds them unavailable and
# Flower's pull retries after 1 s, then 2 s (``PULL_INITIAL_BACKOFF``), however soon they arrive.
# In the child only, the pull retries after 0.05 s, doubling to at most 0.25 s, bounded
# by Flower's own total wait (``PULL_MAX_TIME``) instead of its per-object try count.
class PullBackoff(TypedDict):
    """Keyword arguments of Flower's ``pull_and_inflate_object_from_tree`` (seconds, tries)."""

    initial_backoff: float
    backoff_cap: float
    max_tries_per_object: int | None
    max_time: float | None


PULL_BACKOFF: PullBackoff = {
    "initial_backoff": 0.05,
    "backoff_cap": 0.25,
    "max_tries_per_object": None,
    "max_time": PULL_MAX_TIME,
}
_PULL = "pull_and_inflate_object_from_tree"  # the name run_clientapp calls it by


def fast_pull() -> None:
    """Make this process's ClientApp pull its message with :data:`PULL_BACKOFF`.

    Idempotent. The patch checks its target first.

    Raises
    ------
    PatchMismatch
        Flower's ``run_clientapp`` no longer pulls with ``pull_and_inflate_object_from_tree``.
    """
    namespace = vars(run_clientapp_module)
    current = namespace.get(_PULL)
    if isinstance(current, functools.partial):
        return
    if current is not pull_and_inflate_object_from_tree:
        raise PatchMismatch(f"flwr.supernode.runtime.run_clientapp no longer pulls with {_PULL}")
    namespace[_PULL] = functools.partial(pull_and_inflate_object_from_tree, **PULL_BACKOFF)


def run_clientapp_task(spec: ExecutionSpec) -> None:
    """Do what ``flwr-clientapp --token ...`` does, in this already-warm process.

    The message is pulled with a short backoff (:func:`fast_pull`).

    Parameters
    ----------
    spec : ExecutionSpec
        The task: Runtime API address, token, TLS settings, parent pid.
    """
    fast_pull()
    run_flower_clientapp_task(spec)


def run_flower_clientapp_task(spec: ExecutionSpec) -> None:
    """Run :func:`run_clientapp_task` with Flower's own pull backoff (for comparison).

    Parameters
    ----------
    spec : ExecutionSpec
        The task: Runtime API address, token, TLS settings, parent pid.
    """
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        ),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )
