"""``fedhealth app build|sign|keygen``: app bundles (FABs) that sites and the coordinator approve.

``build`` writes this project's FAB (the bytes ``flwr run`` submits) and prints its sha256 for
``approved_apps``; ``sign`` writes ``<fab>.sig`` with a publisher's Ed25519 key (for sites that
list the publisher in ``trusted_publishers``); ``keygen`` creates such a key pair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhealth.security import apps, signing


def app_command(cmd: str, args: dict[str, Any]) -> int:
    """Run one ``fedhealth app`` subcommand and print what the operator needs next.

    Parameters
    ----------
    cmd : str
        ``build``, ``sign`` or ``keygen``.
    args : dict
        The parsed options: ``out`` (build); ``fab``, ``key``, ``key_id`` (sign); ``key_id``,
        ``dir`` (keygen).

    Returns
    -------
    int
        0.

    Raises
    ------
    ConfigError
        The project cannot be built, a key is unreadable or not Ed25519, a key file exists.
    """
    if cmd == "build":
        from fedhealth.security.apps import project_dir

        path, digest = apps.write_fab(project_dir(), Path(args["out"]))
        print(f"{path}\nsha256 {digest}")
        print(f"approve it: approved_apps: [{digest}]  (site.yaml, coordinator.yaml)")
        return 0
    if cmd == "sign":
        fab_path, key_path = Path(args["fab"]), Path(args["key"])
        fab = fab_path.read_bytes()
        key_id = args["key_id"] or key_path.stem
        digest = apps.fab_sha256(fab)
        sig = signing.sign_fab(fab, signing.load_private_key(key_path), key_id)
        sig_path = signing.write_signature(fab_path, sig, digest)
        print(f"{sig_path}\nsigned sha256 {digest} as {key_id}")
        print(f"launch with it: app_signature: {sig_path}  (coordinator.yaml)")
        return 0
    private, public = signing.create_publisher_key(Path(args["dir"]), args["key_id"])
    print(f"private key {private} (keep it secret)\nsites add to trusted_publishers: {public}")
    print(public.read_text(encoding="utf-8").strip())
    return 0
