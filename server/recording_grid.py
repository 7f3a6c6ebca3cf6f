"""A Grid wrapper that records every reply per site into the run folder.

Flower's strategies aggregate metrics across sites; the coordinator also wants
them per site, and wants to see progress as replies arrive. Wrapping the Grid
(composition) leaves the strategies untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from medfed.core import wire
from medfed.core.run_summary import RunEvent
from medfed.core.runs import RunFolder
from medfed.server.model_reuse import ModelReuse
from medfed.server.refusals import RefusalPolicy
from medfed.server.site_replies import SiteAnswer

#: Replies of a round the ServerApp pulls from the SuperLink at once, in bytes: with
#: large models they are pulled (and folded into the sum) a few at a time.
PULL_BUDGET_BYTES = 256 << 20


def release_arrays(message: Message) -> None:
    """Drop the arrays a message carries, now.

    A Flower ``RecordDict`` whose ``array_records`` was read sits in a reference
    cycle, so a folded reply, and the update it carries, would otherwise stay in
    memory beside the next reply until the cyclic collector next ran (server memory
    O(model): the global model, the sum and one reply).
    """
    for record in message.content.array_records.values():
        record.clear()


class RecordingGrid:
    """Delegates to a Grid; logs replies, refusals and per-round timings."""

    def __init__(
        self,
        grid: Grid,
        folder: RunFolder,
        *,
        refusals: RefusalPolicy | None = None,
        poll_interval: float = 0.1,
        reuse_models: bool = False,
    ) -> None:
        """Wrap ``grid``; replies are recorded in ``folder``.

        ``reuse_models``: sites keep the model they evaluate and the next train
        message names it instead of carrying it (``server/model_reuse.py``).
        """
        self._grid = grid
        self.models = ModelReuse() if reuse_models else None
        self.poll_interval = poll_interval
        self._folder = folder
        self.sites_seen: set[str] = set()
        self.round_seconds: dict[int, float] = {}
        self._round_start: dict[int, float] = {}
        self._evaluated: dict[int, list[dict[str, Any]]] = {}  # round -> sites' eval metrics
        self._site_of: dict[int, str] = {}  # node id -> site name, from its replies
        self._version_of: dict[str, str] = {}  # site -> the medfed version it last reported
        # message id -> the node it went to: an error the SuperLink writes for a node
        # (e.g. "Node Unavailable") comes from the SuperLink, not from that node
        self._dst_of: dict[str, int] = {}
        self._refusals = refusals if refusals is not None else RefusalPolicy()
        self.pull_batch = 1 << 30  # replies pulled at once (see expect_replies_of)

    def restore_timings(self, events: Iterable[RunEvent]) -> None:
        """Take over the round times and sites of a resumed run's earlier attempts."""
        for event in events:
            if event.is_("round-finished") and event.round is not None and "seconds" in event:
                self.round_seconds[event.round] = float(event["seconds"])
            elif event.is_("site-replied") and "site" in event:
                self.sites_seen.add(str(event["site"]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        fold: Callable[[Message], None] | None = None,
    ) -> list[Message]:
        """Send, wait for the replies, and record each of them.

        With ``fold``, each reply that carries a result is handed to it as soon as it is
        pulled and not kept (streaming aggregation); the replies returned are the others.
        """
        messages = list(messages)
        if not messages:
            return []
        phase = str(messages[0].metadata.message_type).split(".")[-1]
        rnd = (
            int(messages[0].content[wire.CONFIG_KEY].get(wire.SERVER_ROUND_KEY, 0))
            if wire.CONFIG_KEY in messages[0].content
            else 0
        )
        if phase == "train":
            self._round_start[rnd] = time.time()
        if self.models is not None:
            messages = self.models.prepare(phase, messages)
        end = None if timeout is None else time.monotonic() + timeout
        kept: list[Message] = []
        again: list[Message] = []  # train messages whose site no longer held the model
        received = failed = 0

        def take(reply: Message) -> None:
            nonlocal received, failed
            if self.models is not None and (full := self.models.missed(reply)) is not None:
                self._dst_of.pop(reply.metadata.reply_to_message_id, None)
                again.append(full)
                return
            received += 1
            failed += reply.has_error()
            self._record(rnd, phase, reply)
            if fold is not None and not reply.has_error():
                fold(reply)
                release_arrays(reply)
            else:
                kept.append(reply)

        def sent() -> None:
            named = self.models.pushed(phase, messages) if self.models is not None else 0
            extra = {"models_named": named} if named else {}  # sent without their model
            self._folder.event("round-sent", round=rnd, phase=phase, sites=len(messages), **extra)

        self._exchange(messages, timeout, take, sent=sent)
        if again:  # once, with the model: a site that restarted lost the one it held
            self._folder.event("model-resent", round=rnd, phase=phase, sites=len(again))
            left = None if end is None else max(end - time.monotonic(), 0.0)
            self._exchange(again, left, take, sent=lambda: None)
        missing = len(messages) - received
        if missing:
            self._folder.event("sites-missing", round=rnd, phase=phase, count=missing)
        elif phase != "evaluate" and failed == received:
            self._refusals.end_if_refused(rnd, phase, "no site replied with a result")
        return kept

    def expect_replies_of(self, nbytes: int) -> None:
        """Pull at most :data:`PULL_BUDGET_BYTES` of replies of ``nbytes`` each at a time."""
        self.pull_batch = max(1, PULL_BUDGET_BYTES // max(int(nbytes), 1))

    def _exchange(
        self,
        messages: list[Message],
        timeout: float | None,
        take: Callable[[Message], None],
        *,
        sent: Callable[[], None],
    ) -> None:
        """Push, call ``sent``, then pull replies every ``poll_interval`` s.

        ``sent`` comes once the SuperLink holds every message, arrays too (so a crash
        after it lost messages the sites could fetch). Flower's Grid polls every 3 s.

        Replies are pulled ``pull_batch`` at a time and each handed to ``take`` before
        the next batch is pulled, so that a round of large updates is never all in memory.
        """
        ids = list(self._grid.push_messages(messages))
        sent()
        self._dst_of.update(
            (mid, m.metadata.dst_node_id) for mid, m in zip(ids, messages, strict=False)
        )
        pending = dict.fromkeys(ids)  # in the order they were sent
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while pending and time.monotonic() < end:
            waiting = list(pending)
            for start in range(0, len(waiting), self.pull_batch):
                for reply in self._grid.pull_messages(waiting[start : start + self.pull_batch]):
                    pending.pop(reply.metadata.reply_to_message_id, None)
                    take(reply)
                    del reply  # let it go before the next one arrives
            if pending:
                time.sleep(self.poll_interval)

    def _record(self, rnd: int, phase: str, reply: Message) -> None:
        node = self._dst_of.pop(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        if self.models is not None:
            self.models.replied(reply, node)
        answer = SiteAnswer.of(reply, node=node)
        if not answer.ok:
            error = answer.error
            # The name this node replied under before; the error's own claim only if none.
            site = self._site_of.get(node) or (error.site if error else f"node-{node}")
            if phase != "evaluate":  # a missing score does not stop training
                self._refusals.add(rnd, site, error)
            detail = (
                {"status": error.status, "rule": error.rule, "reason": error.reason}
                if error
                else {"status": "failed", "reason": answer.failure}
            )
            self._folder.event("site-error", round=rnd, phase=phase, site=site, node=node, **detail)
            return
        site = answer.name()
        self._site_of[node] = site
        self.sites_seen.add(site)
        if answer.version is not None and self._version_of.get(site) != answer.version:
            self._version_of[site] = answer.version  # once per site, not per reply
            self._folder.event("site-version", round=rnd, site=site, version=answer.version)
        metrics = answer.metrics
        if phase != "query":  # secure-aggregation set-up and unmasking carry no metrics
            self._folder.metrics(rnd, site, phase, metrics)
        if phase == "evaluate":
            self._evaluated.setdefault(rnd, []).append(metrics)
        self._folder.event("site-replied", round=rnd, phase=phase, site=site, metrics=metrics)

    def finish_round(self, rnd: int, *, checkpoint: str, unchanged: bool = False) -> None:
        """Record the round's end: its duration and the weighted global metrics.

        ``unchanged``: the round produced no new global model (it was lost).
        """
        seconds = time.time() - self._round_start.get(rnd, time.time())
        self.round_seconds[rnd] = round(seconds, 3)
        rows = self._evaluated.pop(rnd, [])
        total = sum(float(m.get(wire.WEIGHT_KEY, 0)) for m in rows)
        if rows and total > 0:
            keys = set.intersection(*(set(m) for m in rows))
            glob = {
                k: sum(float(m[k]) * float(m[wire.WEIGHT_KEY]) for m in rows) / total
                for k in keys
                if k != wire.WEIGHT_KEY
            }
            glob[wire.WEIGHT_KEY] = total
            self._folder.metrics(rnd, "global", "evaluate", glob)
        extra = {"model_unchanged": True} if unchanged else {}
        self._folder.event(
            "round-finished", round=rnd, seconds=round(seconds, 3), checkpoint=checkpoint, **extra
        )
