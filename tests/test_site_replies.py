"""The server's one reading of a reply (server/site_replies.py), on replies as the ClientApp
writes them (client/app.py): a result, a refusal, a failure, a malformed record."""

from __future__ import annotations

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
