"""A message of a run that ended while it arrived leaves no task behind (Flower 1.42 did).

Drives Flower's real ``_pull_and_store_message`` on a real in-memory NodeState: the
SuperLink reports the run stopped while the SuperNode pulls the message's arrays.
"""

from __future__ import annotations

import hashlib
import io
import time
import types
import zipfile

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run, RunNotRunningException, RunStatus
from flwr.supernode import start_client_internal
from flwr.supernode.nodestate import NodeStateFactory

from medfed.client.ended_run_tasks import drop_replies_of_ended_runs, withdraw_tasks_of_ended_runs

RUN = 7


def _fab() -> Fab:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            "pyproject.toml",
            '[project]\nname="x"\nversion="1.0.0"\n'
            '[tool.flwr.app]\npublisher="m"\n[tool.flwr.app.components]\n'
            'serverapp="a:b"\nclientapp="a:c"\n[tool.flwr.app.config]\n',
        )
    return Fab(hashlib.sha256(buf.getvalue()).hexdigest(), buf.getvalue(), {})


def _receive_one_message_of_a_stopped_run(module: types.ModuleType, *, stopped: bool):
    metadata = Metadata(
        run_id=RUN,
        message_id="",
        src_node_id=1,
        dst_node_id=2,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type="query",
    )
    array = Array(np.zeros(3, dtype=np.float32))
    message = Message(metadata=metadata, content=RecordDict({"w": ArrayRecord({"a": array})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    pending = [(message, get_object_tree(message))]
    fab = _fab()
    run = Run(
        run_id=RUN,
        fab_id="",
        fab_version="",
        fab_hash=fab.hash_str,
        override_config={},
        pending_at="",
        starting_at="",
        running_at="",
        finished_at="",
        status=RunStatus("running", "", ""),
        flwr_aid="",
        federation_id="",
        primary_task_id=None,
        bytes_sent=0,
        bytes_recv=0,
        clientapp_runtime=0.0,
    )

    def pull_object(run_id: int, object_id: str) -> bytes:
        if stopped:
            raise RunNotRunningException(f"run {run_id} stopped")
        raise ConnectionError("the link dropped")  # Flower's own failure path

    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(2)
    returned = module._pull_and_store_message(
        state=state,
        object_store=state.object_store,
        node_config={},
        receive=lambda: pending.pop() if pending else None,
        get_run=lambda rid: run,
        get_fab=lambda fab_hash, rid: fab,
        pull_object=pull_object,
        confirm_message_received=lambda rid, oid: None,
        trusted_entities=None,
    )
    assert returned is None
    return state


def _unfinished(state) -> list:
    return [t for t in state.get_tasks() if t.status.status != "finished"]


def _patched() -> types.ModuleType:
    module = types.ModuleType("sci_copy")
    module._pull_and_store_message = start_client_internal._pull_and_store_message
    assert withdraw_tasks_of_ended_runs(module)
    assert not withdraw_tasks_of_ended_runs(module)  # applied once
    return module


def test_flower_alone_leaves_the_task_of_a_stopped_run_pending() -> None:
    # the reason for the patch: if Flower fixes this, the patch can go
    state = _receive_one_message_of_a_stopped_run(start_client_internal, stopped=True)
    assert [t.run_id for t in _unfinished(state)] == [RUN]


def test_the_task_of_a_run_that_stopped_while_its_message_arrived_is_withdrawn() -> None:
    state = _receive_one_message_of_a_stopped_run(_patched(), stopped=True)
    assert _unfinished(state) == []
    (task,) = state.get_tasks()
    assert task.status.sub_status == "failed" and "ended" in task.status.details
    # nothing is offered to the executor any more
    assert state.get_messages_legacy(run_ids=[RUN], is_reply=False) == []


def test_other_receive_failures_are_left_to_flower() -> None:
    state = _receive_one_message_of_a_stopped_run(_patched(), stopped=False)
    (task,) = state.get_tasks()
    assert task.status.status == "finished"
    assert "Pulling message objects failed" in task.status.details


def _message(run_id: int, kind: str, value: float, reply_to: Message | None = None) -> Message:
    content = RecordDict({"w": ArrayRecord({"a": Array(np.full(3, value, dtype=np.float32))})})
    if reply_to is not None:
        message = Message(content=content, reply_to=reply_to)
    else:
        message = Message(
            metadata=Metadata(
                run_id=run_id,
                message_id="",
                src_node_id=1,
                dst_node_id=2,
                reply_to_message_id="",
                group_id="",
                created_at=time.time(),
                ttl=60.0,
                message_type=kind,
            ),
            content=content,
        )
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _replies_pending(orphan: str) -> object:
    """A SuperNode's state: the new run's query and its reply, and an ended run's reply
    whose objects were cleared with the run (``orphan``: "first", "last" or "none")."""
    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(2)
    query = _message(RUN + 1, "query", 1.0)
    start_client_internal._insert_message(query, state, state.object_store)
    ended = _message(RUN, "train", 2.0)
    start_client_internal._insert_message(ended, state, state.object_store)

    def add_orphan() -> None:
        state.store_message(_message(RUN, "train", 3.0, reply_to=ended))

    if orphan == "first":
        add_orphan()
    start_client_internal._insert_message(
        _message(RUN + 1, "query", 4.0, reply_to=query), state, state.object_store
    )
    if orphan == "last":
        add_orphan()
    return state


def _push(module: types.ModuleType, state) -> list[int]:
    sent: list[int] = []

    def send(message: Message, tree: object, runtime: float) -> tuple[set[str], str]:
        sent.append(message.metadata.run_id)
        return set(), "session"

    module._push_messages(
        state=state, object_store=state.object_store, send=send, push_object=lambda *a: None
    )
    return sent


def test_flower_alone_stops_the_supernode_on_a_reply_whose_content_is_gone() -> None:
    from flwr.supercore.object_store import NoObjectInStoreError

    with pytest.raises(NoObjectInStoreError):
        _push(start_client_internal, _replies_pending("first"))


@pytest.mark.parametrize("orphan", ["first", "last", "none"])
def test_a_reply_of_an_ended_run_is_dropped_and_the_new_runs_reply_is_sent(orphan: str) -> None:
    module = types.ModuleType("sci_copy")
    module._push_messages = start_client_internal._push_messages
    assert drop_replies_of_ended_runs(module)
    assert not drop_replies_of_ended_runs(module)  # applied once
    state = _replies_pending(orphan)
    assert _push(module, state) == [RUN + 1]
    left = [
        e.message.metadata.run_id
        for e in state.msg_store.values()
        if e.message.metadata.reply_to_message_id
    ]
    assert left == []  # neither reply stays behind
