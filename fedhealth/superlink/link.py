"""The coordinator's SuperLink process: ``flower-superlink``, message objects kept in memory.

Flower 1.39 builds its object store (every chunk of every model and update a message carries)
from the same ``--database`` as its link state (``flwr.superlink.config_loader.
get_objectstore_linkstate_factories``): with a SQLite file, each 120 MB model of a 30M-parameter
U-Net is written to disk as blobs and read back once per site, each reply too. Measured with
``benchmarks/round_overhead.py --model large`` (4 sites, TLS, 2 cores) that is 5.9 to 8.4 s
more non-training time per round than the in-memory store (two runs).

This entry point runs the same ``flower-superlink`` (same arguments, same code) with one change:
when ``--database`` names a SQLite file, the link state (nodes and their keys, runs, message
metadata) stays in that file and the objects go to Flower's ``InMemoryObjectStore``, the store
Flower itself uses without ``--database``. Objects live only while their message is in flight.
The price: a SuperLink that dies loses the objects of the messages then in flight, so that
round fails for the sites they were sent to (with the objects in SQLite they would outlive a
restart); a run that stops is resumed from its last checkpoint by ``fedhealth server launch``,
which sends every object anew (``tests/e2e/test_reliability.py`` kills the coordinator at round
3). ``coordinator.yaml`` ``object_store: database`` keeps Flower's behaviour.

Usage: ``python -m fedhealth.superlink.link <flower-superlink arguments>``.
"""

from __future__ import annotations

import sys
from typing import Any

OBJECT_STORES = ("memory", "database")
"""Values of ``coordinator.yaml`` ``object_store``: where Flower keeps message objects."""


def objects_in_memory() -> None:
    """Make ``flower-superlink`` keep message objects in memory whatever ``--database`` says.

    Replaces ``get_objectstore_linkstate_factories`` where ``flwr.superlink.main`` looks it up;
    a non-SQLite (Enterprise) database URL is left to Flower.
    """
    import flwr.superlink.main as superlink_main
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory

    flower = superlink_main.get_objectstore_linkstate_factories  # type: ignore[attr-defined]

    def factories(database: str, federation_manager: Any) -> tuple[Any, Any]:
        url = database.strip().lower()
        if "://" in url and not url.startswith("sqlite://"):
            return flower(database, federation_manager)
        objects = ObjectStoreFactory()  # Flower's in-memory store
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = factories  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Run ``flower-superlink`` with :func:`objects_in_memory`.

    Parameters
    ----------
    argv : list of str, optional
        ``flower-superlink``'s arguments (default None: ``sys.argv[1:]``).

    Returns
    -------
    int
        Its exit status.
    """
    from flwr.superlink.cli import flower_superlink

    objects_in_memory()
    sys.argv = ["flower-superlink", *(sys.argv[1:] if argv is None else argv)]
    flower_superlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
