"""The ClientApp: a thin relay from Flower messages to the site's warm worker.

It runs inside the site daemon (``medfed.client.executor``), or, under Flower's
own isolation, in a process per message; it imports neither torch nor task code,
so either way it is cheap. The worker (``medfed.client.worker``), which holds the
model, the decoded data and the GPU context, does the work. The simulation engine
(``medfed.local.simulation``) puts the same two edges, :func:`request_frame` and
:func:`reply_message`, around an in-process worker.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SType

from medfed.core import wire
from medfed.core.packing import npy_bytes, npy_view
from medfed.core.schema import SecAggReply, SiteRecord, SiteReply, SiteRequest

app = ClientApp()


def request_frame(op: str, msg: Message) -> wire.Frame:
    """The local-channel frame of a Flower message (the worker's request).

    Config values go in the header; bytes values and arrays travel as typed buffers.
    """
    arrays = msg.content.array_records.get(wire.ARRAYS_KEY, ArrayRecord())
    config = msg.content.config_records.get(wire.CONFIG_KEY, ConfigRecord())
    header_config: dict[str, Any] = {}
    buffers = {k: npy_view(a.data) for k, a in arrays.items()}  # read in place, not copied
    for key, value in config.items():
        if isinstance(value, bytes):
            buffers[wire.BYTES_PREFIX + key] = np.frombuffer(value, dtype=np.uint8)
        else:
            header_config[key] = value
    return wire.Frame(SiteRequest(op, msg.metadata.run_id, header_config).header(), buffers)


def reply_message(reply: wire.Frame, msg: Message) -> Message:
    """The Flower reply of a worker frame (or an error naming the site and the reason)."""
    answer = SiteReply.from_header(reply.header)
    if answer.error is not None:
        # A refusal or failure is an explicit error reply naming the site and the reason.
        raise RuntimeError(answer.error.text())
    content = RecordDict(
        {
            wire.METRICS_KEY: MetricRecord(answer.metrics),
            wire.SITE_RECORD_KEY: ConfigRecord(SiteRecord.here(answer.site).entries()),
        }
    )
    blobs = {
        k[len(wire.BYTES_PREFIX) :]: v.tobytes()
        for k, v in reply.arrays.items()
        if k.startswith(wire.BYTES_PREFIX)
    }
    if blobs:  # checked against the schema before it leaves the site
        content[wire.SECAGG_RECORD_KEY] = ConfigRecord(SecAggReply.from_record(blobs).blobs())
    arrays = {
        k: Array(
            dtype=str(v.dtype),
            shape=tuple(int(n) for n in v.shape),
            stype=SType.NUMPY,
            # the .npy bytes as received (no copy), else one copy (Array(v) makes two)
            data=reply.npy.get(k) or npy_bytes(v),
        )
        for k, v in reply.arrays.items()
        if not k.startswith(wire.BYTES_PREFIX)
    }
    if arrays:
        content[wire.ARRAYS_KEY] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


def _relay(op: str, msg: Message, context: Context) -> Message:
    socket_path = str(context.node_config.get(wire.NODE_WORKER_SOCKET, ""))
    if not socket_path:
        raise RuntimeError(
            f"node config key {wire.NODE_WORKER_SOCKET!r} is missing: this SuperNode was not "
            "started by `medfed site start`"
        )
    return reply_message(wire.call_worker(socket_path, request_frame(op, msg)), msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Relay a training message to the warm worker."""
    return _relay("train", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Relay a query (secure-aggregation set-up or unmasking) to the warm worker."""
    return _relay("query", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Relay an evaluation message to the warm worker."""
    return _relay("evaluate", msg, context)
