"""A restarted SuperLink lets its sites in at once (:mod:`medfed.server.stale_nodes`);
its message payloads live in memory, its state on disk.

Driven on Flower's own SQL link state, as the SuperLink keeps it in its database file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

from medfed.server.stale_nodes import database_arg, mark_nodes_offline


def _state(db: Path):  # noqa: ANN202 - Flower's LinkState
    return LinkStateFactory(str(db), NoOpFederationManager(), ObjectStoreFactory(str(db))).state()


def _status(db: Path, node_id: int) -> str:
    return _state(db).get_node_info(node_ids=[node_id])[0].status


def test_a_node_online_at_a_restart_is_offline_and_can_connect_again(tmp_path: Path) -> None:
    db = tmp_path / "superlink.db"
    state = _state(db)
    node = state.create_node("aid", "site-a", b"site-a-key", heartbeat_interval=30.0)
    other = state.create_node("aid", "site-b", b"site-b-key", heartbeat_interval=30.0)
    assert state.activate_node(node, heartbeat_interval=30.0)
    # the SuperLink dies; the same SuperNode dials the restarted one before 60 s passed
    assert not _state(db).activate_node(node, heartbeat_interval=30.0)  # Flower alone
    assert mark_nodes_offline(db) == 1
    assert _status(db, node) == "offline" and _status(db, other) == "registered"
    assert _state(db).activate_node(node, heartbeat_interval=30.0)
    assert _status(db, node) == "online"


def test_no_database_file_is_left_alone(tmp_path: Path) -> None:
    assert mark_nodes_offline(tmp_path / "new.db") == 0
    assert not (tmp_path / "new.db").exists()
    empty = tmp_path / "other.db"
    empty.write_bytes(b"")
    assert mark_nodes_offline(empty) == 0


def test_the_database_is_read_from_flower_superlinks_arguments() -> None:
    assert database_arg(["--host", "127.0.0.1", "--database", "/s/db"]) == Path("/s/db")
    assert database_arg(["--database=/s/db"]) == Path("/s/db")
    assert database_arg(["--host", "127.0.0.1"]) is None


def test_the_superlink_keeps_payloads_in_memory_and_its_state_in_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr.superlink.config_loader as config_loader
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore

    from medfed.server.superlink_launcher import keep_payloads_in_memory

    monkeypatch.setattr(config_loader, "ObjectStoreFactory", config_loader.ObjectStoreFactory)
    db = tmp_path / "superlink.db"
    keep_payloads_in_memory()
    objects, states = config_loader.get_objectstore_linkstate_factories(
        str(db), NoOpFederationManager()
    )
    assert isinstance(objects.store(), InMemoryObjectStore)
    node = states.state().create_node("aid", "site-a", b"key", heartbeat_interval=30.0)
    assert _state(db).get_node_info(node_ids=[node])[0].status == "registered"  # on disk
