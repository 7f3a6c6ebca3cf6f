"""The global model goes to a site once per round: kept at evaluation, named by digest in
the next train message, sent again when the site lost it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SType

from medfed.client.held_models import HeldModels
from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.packing import WEIGHTS_KEY, model_digest, npy_bytes
from medfed.core.runs import RunFolder
from medfed.core.schema import HELD_MODEL_KEY, HELD_MODEL_RULE, SiteError
from medfed.server.model_reuse import ModelReuse
from medfed.server.recording_grid import RecordingGrid
from tests.test_worker import global_weights, make_worker, request

PLAIN = RunConfig(secure_aggregation="off", task="tiny-seg", seed=3)


def _named(frame: wire.Frame, digest: str) -> wire.Frame:
    frame.header["config"][HELD_MODEL_KEY] = digest
    return frame


# ---------------------------------------------------------------- the site's side


def test_a_train_message_naming_the_evaluated_model_trains_as_if_it_carried_it(
    tmp_path: Path,
) -> None:
    start = global_weights()
    digest = model_digest(start)
    carried = make_worker(tmp_path / "a").handle(request("train", PLAIN, start, rnd=2))
    worker = make_worker(tmp_path / "b")
    evaluated = worker.handle(_named(request("evaluate", PLAIN, start), digest))
    assert evaluated.header["ok"], evaluated.header
    named = worker.handle(_named(request("train", PLAIN, {}, rnd=2), digest))
    assert named.header["ok"], named.header
    np.testing.assert_array_equal(named.arrays[WEIGHTS_KEY], carried.arrays[WEIGHTS_KEY])


def test_a_site_that_does_not_hold_the_named_model_says_so_and_trains_nothing(
    tmp_path: Path,
) -> None:
    worker = make_worker(tmp_path)
    start = global_weights()
    worker.handle(_named(request("evaluate", PLAIN, start), model_digest(start)))
    other = {WEIGHTS_KEY: start[WEIGHTS_KEY] + 1.0}
    reply = worker.handle(_named(request("train", PLAIN, {}, rnd=2), model_digest(other)))
    assert not reply.header["ok"]
    error = reply.header
    assert error["rule"] == HELD_MODEL_RULE and error["status"] == "failed"
    assert "sends the model again" in error["reason"]
    assert not [r for r in worker.audit.read() if r["event"] == "update-sent"]
    # a train message with arrays that also names a model is malformed, not guessed at
    both = worker.handle(_named(request("train", PLAIN, start, rnd=2), model_digest(start)))
    assert not both.header["ok"] and both.header["rule"] == HELD_MODEL_RULE


def test_the_kept_model_is_read_only_bounded_and_forgotten_with_its_run() -> None:
    held = HeldModels(keep_sessions=2)
    weights = {WEIGHTS_KEY: np.arange(6, dtype=np.float32)}
    digest = held.keep("s1", weights)
    assert digest == model_digest(weights)
    kept = held.get("s1", digest)
    assert kept is not None
    with pytest.raises(ValueError, match="read-only"):
        kept[WEIGHTS_KEY][0] = 5.0
    assert held.get("s1", "0" * 64) is None
    held.keep("s2", weights)
    held.keep("s3", weights)  # a third run's model pushes out the oldest one
    assert held.get("s1", digest) is None and held.get("s3", digest) is not None
    held.forget("s3")
    assert held.get("s3", digest) is None


# ---------------------------------------------------------------- the server's side


@pytest.fixture(autouse=True)
def _as_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower fills a new message's metadata from the ServerApp's task identity.
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _round(nodes: list[int], kind: str, model: np.ndarray, rnd: int) -> list[Message]:
    """Messages as Flower's strategies build them: one RecordDict shared by all."""
    shared = RecordDict(
        {
            wire.ARRAYS_KEY: ArrayRecord(
                {
                    WEIGHTS_KEY: Array(
                        dtype="float32",
                        shape=tuple(model.shape),
                        stype=SType.NUMPY,
                        data=npy_bytes(model),
                    )
                }
            ),
            wire.CONFIG_KEY: ConfigRecord({wire.SERVER_ROUND_KEY: rnd}),
        }
    )
    return [Message(content=shared, dst_node_id=n, message_type=kind) for n in nodes]


class Sites:
    """A grid whose sites answer as told: a result, an error, or 'not held' once."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.lost: set[int] = set()  # nodes whose next light train message misses
        self.failing: set[int] = set()

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{len(self.pushed)}"
            m.metadata.__dict__["_message_id"] = mid
            self.pushed.append(m)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        return [self._reply(m) for m in self.pushed if m.metadata.message_id in set(ids)]

    def _reply(self, m: Message) -> Any:
        node = m.metadata.dst_node_id
        meta = SimpleNamespace(src_node_id=node, reply_to_message_id=m.metadata.message_id)
        light = wire.ARRAYS_KEY not in m.content
        if node in self.failing or (light and node in self.lost):
            self.lost.discard(node)
            rule = HELD_MODEL_RULE if light else ""
            text = "RuntimeError: " + SiteError(f"site-{node}", "failed", rule, "lost").text()
            return SimpleNamespace(
                metadata=meta, has_error=lambda: True, error=SimpleNamespace(reason=text)
            )
        content = RecordDict(
            {
                wire.SITE_RECORD_KEY: ConfigRecord({"name": f"site-{node}"}),
                wire.METRICS_KEY: ConfigRecord({}),
            }
        )
        return SimpleNamespace(metadata=meta, has_error=lambda: False, content=content)


def test_train_messages_name_the_model_a_site_evaluated_and_resend_it_when_lost(
    tmp_path: Path,
) -> None:
    sites = Sites()
    folder = RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=3))
    grid = RecordingGrid(sites, folder, poll_interval=0.0, reuse_models=True)  # type: ignore[arg-type]
    model = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    digest = model_digest({WEIGHTS_KEY: model})

    sites.failing = {3}  # node 3's evaluation fails: it is not known to hold the model
    evaluate = _round([1, 2, 3], MessageType.EVALUATE, model, rnd=1)
    grid.send_and_receive(evaluate, timeout=5)
    asked = [m.content[wire.CONFIG_KEY][HELD_MODEL_KEY] for m in sites.pushed]
    assert asked == [digest] * 3
    assert HELD_MODEL_KEY not in evaluate[0].content[wire.CONFIG_KEY]  # shared record untouched

    sites.failing, sites.lost = set(), {2}  # node 2's daemon restarted since
    sites.pushed.clear()
    train = _round([1, 2, 3], MessageType.TRAIN, model, rnd=2)
    replies = grid.send_and_receive(train, timeout=5)
    first = {m.metadata.dst_node_id: m for m in sites.pushed[:3]}
    assert wire.ARRAYS_KEY not in first[1].content and wire.ARRAYS_KEY not in first[2].content
    assert first[1].content[wire.CONFIG_KEY][HELD_MODEL_KEY] == digest
    assert wire.ARRAYS_KEY in first[3].content  # not known to hold it: the full message
    assert wire.ARRAYS_KEY in train[0].content  # the strategy's messages are not edited
    # node 2 said it lost the model: the full message went again, and only its answer counts
    assert [m.metadata.dst_node_id for m in sites.pushed[3:]] == [2]
    assert wire.ARRAYS_KEY in sites.pushed[3].content
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert all(not r.has_error() for r in replies)
    sent = [e for e in folder.read_events() if e.is_("round-sent") and e.round == 2]
    assert sent[0]["models_named"] == 2
    events = [e for e in folder.read_events() if e.is_("model-resent")]
    assert len(events) == 1 and events[0]["sites"] == 1
    assert not [e for e in folder.read_events() if e.is_("site-error") and e.round == 2]

    # a model that differs from the evaluated one is always sent
    sites.pushed.clear()
    grid.send_and_receive(_round([1], MessageType.TRAIN, model + 1, rnd=3), timeout=5)
    assert wire.ARRAYS_KEY in sites.pushed[0].content


def test_without_model_reuse_every_message_carries_the_model() -> None:
    reuse = ModelReuse()
    model = np.ones(10, dtype=np.float32)
    train = _round([1], MessageType.TRAIN, model, rnd=2)
    assert reuse.prepare("train", train) == train  # no evaluation seen: nothing is held
    assert reuse.prepare("query", train) == train
