"""One ClientApp task in a warm child: Flower's ``run_clientapp``, pulling fast, installing once.

The targets :class:`fedhealth.supernode.warm.WarmExecutor` runs in each forked child.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TypedDict

from flwr.cli.install import install_from_fab
from flwr.supercore.constant import PULL_MAX_TIME
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.superexec.executor import ExecutionSpec
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supercore.utils import get_flwr_home
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


FAST_PULL = functools.partial(pull_and_inflate_object_from_tree, **PULL_BACKOFF)
"""Flower's pull with :data:`PULL_BACKOFF`."""


def fast_pull() -> None:
    """Make this process's ClientApp pull its message with :data:`PULL_BACKOFF`.

    Idempotent. The patch checks its target first.

    Raises
    ------
    PatchMismatch
        Flower's ``run_clientapp`` no longer pulls with ``pull_and_inflate_object_from_tree``.
    """
    _replace(_PULL, pull_and_inflate_object_from_tree, FAST_PULL)


def _replace(name: str, stock: object, replacement: object) -> None:
    """Replace ``name`` in Flower's ``run_clientapp`` module, once, if it is still ``stock``."""
    namespace = vars(run_clientapp_module)
    current = namespace.get(name)
    if current is replacement:
        return
    if current is not stock:
        raise PatchMismatch(f"flwr.supernode.runtime.run_clientapp no longer calls {name}")
    namespace[name] = replacement


_INSTALL = "install_from_fab"  # the name run_clientapp calls it by
INSTALLED = "fedhealth-fab-installs"
"""Folder under ``FLWR_HOME``: one file per FAB installed, named by the FAB's SHA-256 and
holding the folder Flower installed it to."""


def install_once(
    fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
) -> Path:
    """Run Flower's ``install_from_fab`` unless these exact FAB bytes are installed already.

    Flower's ClientApp calls ``install_from_fab`` for every message: it unpacks the whole FAB
    into a temporary folder and checks every file's hash (about 30 ms for fedhealth's 1 MB, 161
    files, on a busy 2-core machine; four times a round under SecAgg+), then keeps the folder
    already installed for that FAB if there is one. Here a FAB whose SHA-256 was installed and
    checked by an earlier task, and whose folder still exists, returns that folder at once; any
    other FAB (a new one, one byte changed, a removed folder) goes through Flower's install,
    checks included. What is then imported is the same folder either way.

    Parameters
    ----------
    fab_file : Path or bytes
        The FAB (Flower's argument).
    install_dir : Path or None, default None
        Flower's argument; a FAB installed elsewhere than ``FLWR_HOME`` is never remembered.
    skip_prompt : bool, default False
        Flower's argument; only an install without prompts (the ClientApp's) is remembered.

    Returns
    -------
    Path
        The installed app's folder.

    Raises
    ------
    click.ClickException
        As Flower's ``install_from_fab``: the FAB is malformed or its hashes do not verify.
    """
    if not isinstance(fab_file, bytes) or install_dir is not None or not skip_prompt:
        return install_from_fab(fab_file, install_dir, skip_prompt)
    record = get_flwr_home() / INSTALLED / hashlib.sha256(fab_file).hexdigest()
    try:
        path = Path(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        path = None
    if path is not None and path.is_dir():
        return path
    path = install_from_fab(fab_file, skip_prompt=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f"{record.name}.{os.getpid()}.part")
    partial.write_text(str(path), encoding="utf-8")
    os.replace(partial, record)  # another site's task may write the same record: both whole
    return path


def install_fab_once() -> None:
    """Make this process's ClientApp install each FAB once (:func:`install_once`).

    Idempotent. The patch checks its target first.

    Raises
    ------
    PatchMismatch
        Flower's ``run_clientapp`` no longer installs with ``install_from_fab``.
    """
    _replace(_INSTALL, install_from_fab, install_once)


def run_clientapp_task(spec: ExecutionSpec) -> None:
    """Do what ``flwr-clientapp --token ...`` does, in this already-warm process.

    The message is pulled with a short backoff (:func:`fast_pull`); a FAB installed by an
    earlier task is not unpacked again (:func:`install_fab_once`).

    Parameters
    ----------
    spec : ExecutionSpec
        The task: Runtime API address, token, TLS settings, parent pid.
    """
    fast_pull()
    install_fab_once()
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
