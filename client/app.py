"""The per-message ClientApp: a thin relay to the site's warm worker.

Flower starts a fresh ClientApp process for every message. This module imports
neither torch nor the task code, so that process starts in about a second; the
worker (``medfed.client.worker``), which holds the model, the decoded data and
the GPU context, does the work.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from medfed.core import wire

app = ClientApp()


def _config_dict(record: ConfigRecord) -> dict[str, Any]:
    return {k: (v.decode("latin-1") if isinstance(v, bytes) else v) for k, v in record.items()}


def _relay(op: str, msg: Message, context: Context) -> Message:
    socket_path = str(context.node_config.get(wire.NODE_WORKER_SOCKET, ""))
    if not socket_path:
        raise RuntimeError(
            f"node config key {wire.NODE_WORKER_SOCKET!r} is missing: this SuperNode was not "
            "started by `medfed site start`"
        )
    arrays = msg.content.array_records.get(wire.ARRAYS_KEY, ArrayRecord())
    config = msg.content.config_records.get(wire.CONFIG_KEY, ConfigRecord())
    request = wire.Frame(
        header={"op": op, "config": _config_dict(config), "run_id": msg.metadata.run_id},
        arrays={k: a.numpy() for k, a in arrays.items()},
    )
    reply = wire.call_worker(socket_path, request)
    if not reply.header.get("ok"):
        # A refusal or failure is an explicit error reply naming the site and the reason.
        raise RuntimeError(
            f"site {reply.header.get('site', '?')} {reply.header.get('status', 'failed')}: "
            f"{reply.header.get('reason', 'no reason given')}"
        )
    content = RecordDict(
        {
            wire.METRICS_KEY: MetricRecord(reply.header["metrics"]),
            wire.SITE_RECORD_KEY: ConfigRecord({"name": reply.header["site"]}),
        }
    )
    if reply.arrays:
        content[wire.ARRAYS_KEY] = ArrayRecord({k: Array(v) for k, v in reply.arrays.items()})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Relay a training message to the warm worker."""
    return _relay("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Relay an evaluation message to the warm worker."""
    return _relay("evaluate", msg, context)
