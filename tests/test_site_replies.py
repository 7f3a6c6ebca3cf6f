"""The server's one reading of a reply (server/site_replies.py), on replies as the ClientApp
writes them (client/app.py): a result, a refusal, a failure, a malformed record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common import MessageType

from medfed.client.app import reply_message
from medfed.core import wire
from medfed.core.packing import WEIGHTS_KEY
from medfed.core.schema import SecAggReply, SiteError, SiteReply
from medfed.server.site_replies import SiteAnswer


@pytest.fixture(autouse=True)
def _as_a_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's task identity, as a ServerApp process has it (replies carry its run)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _sent(node: int = 7) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m-1"
    return msg


def test_a_result_reads_back_with_its_site_metrics_secagg_and_update() -> None:
    update = np.arange(5, dtype=np.float32)
    secagg = SecAggReply(update=b"header")
    frame = wire.Frame(
        SiteReply.result("site-a", {wire.WEIGHT_KEY: 3.0, "loss": 0.5}).header(),
        {
            WEIGHTS_KEY: update,
            **{
                wire.BYTES_PREFIX + k: np.frombuffer(v, np.uint8) for k, v in secagg.blobs().items()
            },
        },
    )
    answer = SiteAnswer.of(reply_message(frame, _sent()), node=7)
    assert answer.ok and answer.unreadable is None and answer.node == 7
    assert answer.name() == "site-a" and answer.metrics == {wire.WEIGHT_KEY: 3.0, "loss": 0.5}
    assert answer.secagg == secagg
    np.testing.assert_array_equal(answer.update(), update)


@pytest.mark.parametrize("status", ["refused", "failed"])
def test_an_error_reply_reads_back_as_the_site_error(status: str) -> None:
    error = SiteError("site-b", status, "policy.allowed_tasks" if status == "refused" else "", "no")
    reply = Message(Error(code=0, reason=f"RuntimeError: {error.text()}"), reply_to=_sent())
    answer = SiteAnswer.of(reply, node=7)
    assert not answer.ok and answer.error == error
    assert answer.name() == "node-7"  # an error reply carries no site record
    other = Message(Error(code=0, reason="Node Unavailable"), reply_to=_sent())
    answer = SiteAnswer.of(other, node=7)
    assert not answer.ok and answer.error is None and answer.failure == "Node Unavailable"


def test_a_malformed_secagg_record_is_unreadable_not_a_crash() -> None:
    from flwr.app import ConfigRecord, MetricRecord

    body = RecordDict(
        {
            wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: 1.0}),
            wire.SECAGG_RECORD_KEY: ConfigRecord({"updat": b"typo"}),
        }
    )
    answer = SiteAnswer.of(Message(body, reply_to=_sent()), node=7)
    assert answer.ok and answer.unreadable is not None and "updat" in answer.unreadable


def test_a_reply_carries_the_sites_medfed_version_and_nothing_else_about_it() -> None:
    from medfed.core.schema import SITE_VERSION_FIELD, SiteRecord, medfed_version

    frame = wire.Frame(SiteReply.result("site-a", {wire.WEIGHT_KEY: 1.0}).header())
    reply = reply_message(frame, _sent())
    record = dict(reply.content[wire.SITE_RECORD_KEY])
    assert record == {"name": "site-a", SITE_VERSION_FIELD: medfed_version()}
    answer = SiteAnswer.of(reply, node=7)
    assert answer.name() == "site-a" and answer.version == medfed_version()
    assert SiteRecord.from_record(SiteRecord.here("site-a").entries()) == SiteRecord(
        "site-a", medfed_version()
    )


def test_a_reply_without_a_version_reads_as_not_reported_and_a_bad_one_is_unreadable() -> None:
    from flwr.app import ConfigRecord, MetricRecord

    from medfed.core.schema import SITE_VERSION_FIELD

    def answer(record: dict[str, str]) -> SiteAnswer:
        body = RecordDict(
            {
                wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: 1.0}),
                wire.SITE_RECORD_KEY: ConfigRecord(record),
            }
        )
        return SiteAnswer.of(Message(body, reply_to=_sent()), node=7)

    older = answer({"name": "site-a"})  # a site from before the version field
    assert older.unreadable is None and older.name() == "site-a" and older.version is None
    bad = answer({"name": "site-a", SITE_VERSION_FIELD: "<script>alert(1)</script>"})
    assert bad.unreadable is not None and SITE_VERSION_FIELD in bad.unreadable


def test_the_grid_records_a_sites_version_once_per_run_not_per_reply(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    from medfed.core.config import RunConfig
    from medfed.core.runs import RunFolder
    from medfed.core.schema import medfed_version
    from medfed.server.recording_grid import RecordingGrid

    class Grid:
        def __init__(self) -> None:
            self.sent: list[Message] = []

        def push_messages(self, messages: list[Message]) -> list[str]:
            self.sent = list(messages)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, ids: list[str]) -> list[Message]:
            frame = wire.Frame(SiteReply.result("site-a", {wire.WEIGHT_KEY: 1.0}).header())
            return [reply_message(frame, m) for m in self.sent]

    folder = RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=2))
    grid = RecordingGrid(Grid(), folder)  # type: ignore[arg-type]
    for rnd in (1, 2):
        msg = Message(
            RecordDict({wire.CONFIG_KEY: ConfigRecord({wire.SERVER_ROUND_KEY: rnd})}),
            dst_node_id=7,
            message_type=MessageType.TRAIN,
        )
        msg.metadata.__dict__["_message_id"] = f"m-{rnd}"
        grid.send_and_receive([msg])
    events = folder.read_events()
    assert [e["event"] for e in events].count("site-replied") == 2
    versions = [e for e in events if e["event"] == "site-version"]
    assert [(e["round"], e["site"], e["version"]) for e in versions] == [
        (1, "site-a", medfed_version())
    ]
