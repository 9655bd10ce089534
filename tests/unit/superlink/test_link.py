"""The coordinator's SuperLink: link state in SQLite, message objects in memory."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedhealth.errors import ConfigError
from fedhealth.superlink.service import superlink_argv
from fedhealth.superlink.settings import CoordinatorSettings, load


@pytest.mark.parametrize("database", ["file", "sqlite"])
def test_objects_stay_in_memory_while_the_link_state_is_in_sqlite(tmp_path, monkeypatch, database):
    import flwr.superlink.main as superlink_main
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink.federation import NoOpFederationManager

    from fedhealth.superlink.link import objects_in_memory

    flower = superlink_main.get_objectstore_linkstate_factories
    monkeypatch.setattr(superlink_main, "get_objectstore_linkstate_factories", flower)
    record = ArrayRecord({"w": Array(np.ones(1000, np.float32))})  # a model, as Flower stores it

    def store_a_model(factories: Any, path: Path) -> tuple[int, int]:
        """Create a run and store the model in it; count the runs and objects on disk."""
        url = str(path) if database == "file" else f"sqlite:///{path}"
        objects, links = factories(url, NoOpFederationManager())
        state = links.state()
        assert isinstance(state, SqlLinkState)
        assert state.object_store is objects.store()  # the servicers and the state share it
        run_id = state.create_run("app", "1.0", "hash", {}, "", None, "", TaskType.SERVER_APP)
        objects.store().preregister(run_id, get_object_tree(record))
        for object_id, obj in get_all_nested_objects(record).items():
            objects.store().put(object_id, obj.deflate())
        assert objects.store().get(record.object_id) is not None
        with sqlite3.connect(path) as db:
            runs = db.execute("SELECT COUNT(*) FROM run").fetchone()[0]
            return runs, db.execute("SELECT COUNT(*) FROM objects").fetchone()[0]

    # Flower's own choice: the model's objects go into the same file
    nested = len(get_all_nested_objects(record))  # the record, its array, the array's chunks
    assert store_a_model(flower, tmp_path / "flower.db") == (1, nested)
    objects_in_memory()
    patched = superlink_main.get_objectstore_linkstate_factories
    assert store_a_model(patched, tmp_path / "superlink.db") == (1, 0)  # the run, no object
    assert isinstance(patched(":memory:", NoOpFederationManager())[0].store(), InMemoryObjectStore)


def test_the_service_runs_the_superlink_through_the_link_module(tmp_path):
    def settings(*extra: str) -> CoordinatorSettings:
        return load(None, [f"state_dir={tmp_path / 'state'}", *extra], insecure=True)

    argv = superlink_argv(settings())
    assert argv[1:3] == ["-m", "fedhealth.superlink.link"] and "--database" in argv
    flower = superlink_argv(settings("object_store=database"))
    assert flower[0].endswith("flower-superlink") and "--database" in flower
    with pytest.raises(ConfigError, match="object_store=disk"):
        settings("object_store=disk")
