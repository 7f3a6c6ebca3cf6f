"""Secure aggregation around any mean-aggregating Flower Message-API strategy.

The wrapped strategy keeps its own logic (FedAvg, FedProx, FedAvgM, FedAdam,
FedYogi, FedAdagrad): each round it is handed ONE reply whose arrays are the
securely aggregated weighted mean (global + mean of the sites' masked updates)
and whose weight is the sites' total, so server optimizers act on the mean as
they would without encryption. The server never holds one site's update.

Message flow (docs/secure-aggregation.md): once per run, a short join query in
which every site advertises its per-run key; then one message per round (the
masked update); after a dropout (default mode) or every round (strict mode), one
short unmasking query to the survivors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from medfed.core import wire
from medfed.core.errors import MedfedError
from medfed.core.packing import WEIGHTS_KEY
from medfed.core.runs import RunFolder
from medfed.core.schema import SiteError, SiteInstruction
from medfed.core.secagg import (
    Aggregator,
    KeyAdvert,
    MaskedUpdate,
    RecoveryError,
    Reveal,
    Roster,
    SecAggConfig,
    SecAggError,
)
from medfed.server.recording_grid import RecordingGrid
from medfed.server.refusals import RefusalPolicy, SitesRefused
from medfed.server.site_replies import SiteAnswer
from medfed.server.streaming_mean import vector_array
from medfed.server.wrapped_strategy import WrappedStrategy

DEADLINE_MARGIN = 0.1  # sites stop sending this fraction of the round timeout early
JOIN_RETRY_S = 30.0  # how long a site that the SuperLink says is unavailable is asked again


class SecureAggregation(WrappedStrategy):
    """Wraps ``inner`` so that it only ever sees the securely aggregated mean."""

    def __init__(
        self,
        inner: Strategy,
        *,
        grid: RecordingGrid,
        folder: RunFolder,
        run_id: str,
        config: SecAggConfig,
        size: int,
        round_timeout: float,
        run_entries: dict[str, Any],
        refusals: RefusalPolicy,
        certificates: dict[bytes, str] | None = None,
    ) -> None:
        super().__init__(inner)
        self.grid = grid
        self.refusals = refusals
        self.folder = folder
        self.run_id = run_id
        self.config = config
        self.size = size
        self.round_timeout = round_timeout
        self.run_entries = run_entries  # the run's JSON and its coordinator's signature
        #: Enrolled sites' secure-aggregation certificates, by identity key: each site
        #: checks its peers' keys with them (the server cannot make them).
        self.certificates = certificates or {}
        self.certified: dict[str, str] = {}
        self.aggregator: Aggregator | None = None
        self.site_of: dict[int, str] = {}
        #: Sites whose privacy budget covers fewer rounds than the run's, as they said
        #: when they joined (they will refuse the rounds after).
        self.covers: dict[str, int] = {}
        self.roster_bytes = b""
        self.directory: dict[str, str] = {}
        self._global: np.ndarray | None = None
        self._metrics: list[dict[str, Any]] = []  # the round's replies' metrics

    @classmethod
    def joined(cls, inner: Strategy, *, min_sites: int, **kwargs: Any) -> SecureAggregation:
        """The strategy, ready for its first round: every site's key advert collected.

        ``kwargs`` are the constructor's; this is how a run gets one (a strategy that
        has not joined its sites cannot configure a round).
        """
        strategy = cls(inner, **kwargs)
        try:
            strategy._join(min_sites)
        except SitesRefused:  # the sites that joined drop their keys and budget holds
            strategy.end("refused")
            raise
        except Exception:
            strategy.end("failed")
            raise
        return strategy

    # ------------------------------------------------------------------ setup
    def _join(self, min_sites: int) -> None:
        """Once per run: collect every site's signed key advert and build the roster."""
        sample_nodes(self.grid, min_sites, min_sites)  # waits until min_sites are online
        adverts: list[KeyAdvert] = []
        directory: dict[str, bytes] = {}
        for reply in self._join_replies():
            answer = SiteAnswer.of(reply)
            if not answer.ok:
                continue
            try:
                if answer.unreadable is not None or answer.secagg is None:
                    raise ValueError(answer.unreadable or "no secure-aggregation record")
                advert = KeyAdvert.from_bytes(answer.secagg.need("advert"))
                identity = answer.secagg.need("identity")
            except (SecAggError, KeyError, ValueError) as exc:  # that site is left out
                self.folder.event(
                    "warning",
                    reason=f"node {answer.node}'s join reply is unreadable "
                    f"({type(exc).__name__}: {exc}); it is left out of the run",
                )
                continue
            adverts.append(advert)
            directory[advert.site_id] = identity
            self.site_of[answer.node] = advert.site_id
            if wire.BUDGET_ROUNDS_KEY in answer.metrics:
                self.covers[advert.site_id] = int(answer.metrics[wire.BUDGET_ROUNDS_KEY])
        # Masking needs threshold + 1 sites, and a sum of fewer than two is one site's update.
        needed = max(min_sites, 2, (self.config.threshold or 0) + 1)
        if len(adverts) < needed:
            self.refusals.end_if_refused(
                0, "query", f"{len(adverts)} of the {needed} sites needed joined"
            )
            raise MedfedError(
                f"Secure aggregation needs {needed} sites, {len(adverts)} joined.",
                fix="see the site errors above (refusals name the site's rule); or lower "
                "--min-sites",
            )
        roster = Roster.of(self.run_id, adverts)
        self.aggregator = Aggregator(
            self.config, self.run_id, roster, directory=directory, size=self.size
        )
        self.roster_bytes = roster.to_bytes()
        self.directory = {s: k.hex() for s, k in directory.items()}
        self.certified = {
            s: self.certificates[k] for s, k in directory.items() if k in self.certificates
        }
        self.folder.event(
            "secure-aggregation-ready",
            mode=self.config.mode,
            sites=list(roster.site_ids),
            threshold=self.aggregator.threshold,
        )

    def _join_replies(self) -> list[Message]:
        """Every online site's answer to the join; a site unavailable is asked again.

        A site whose SuperNode is restarting (after the server's own restart, say)
        misses its heartbeats for a few seconds and the SuperLink answers "Node
        Unavailable" for it: it is asked again (its node id may be new) for up to
        ``JOIN_RETRY_S``, so that a run does not start, or resume, without it.
        """
        join = ConfigRecord(
            {
                **self.run_entries,
                **SiteInstruction(join=json.dumps(self.config.to_dict())).entries(),
            }
        )
        end = time.monotonic() + min(JOIN_RETRY_S, self.round_timeout)
        answered: set[int] = set()
        kept: list[Message] = []
        while True:
            nodes = [n for n in self.grid.get_node_ids() if n not in answered]
            replies = self.grid.send_and_receive(
                [
                    Message(
                        RecordDict({wire.CONFIG_KEY: join}),
                        dst_node_id=n,
                        message_type=MessageType.QUERY,
                    )
                    for n in nodes
                ],
                timeout=self.round_timeout,
            )
            unavailable = False
            for reply in replies:
                if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                    unavailable = True
                    continue
                answered.add(reply.metadata.src_node_id)
                kept.append(reply)
            if not unavailable or time.monotonic() >= end:
                return kept
            time.sleep(1.0)

    # --------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages, for roster sites, with this round's secagg keys."""
        assert self.aggregator is not None, "call setup() first"
        self._global = arrays[WEIGHTS_KEY].numpy().astype(np.float32)
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if m.metadata.dst_node_id in self.site_of
        ]
        participants = sorted(self.site_of[m.metadata.dst_node_id] for m in messages)
        self._end_if_budgets_run_out(server_round, participants)
        deadline = time.time() + self.round_timeout * (1 - DEADLINE_MARGIN)
        entries = SiteInstruction(
            roster=self.roster_bytes,
            directory=self.directory,
            certificates=self.certified,
            participants=tuple(participants),
            deadline=deadline,
        ).entries()
        for message in messages:
            message.content[wire.CONFIG_KEY].update(entries)
        self.aggregator.begin_round(server_round, participants=participants)
        self._metrics = []
        return messages

    def _end_if_budgets_run_out(self, server_round: int, participants: list[str]) -> None:
        """End the run before this round if the sites' own forecasts say it will be lost.

        A site said at the join how many rounds its budget covers. Past them it refuses,
        after the others trained and masked against it; if too few remain for secure
        aggregation, the round is lost, and the epsilon the others spent on it with it.
        The forecast only ends a run that way: the site itself still decides each round.
        """
        out = [s for s in participants if self.covers.get(s, server_round) < server_round]
        assert self.aggregator is not None
        if not out or len(participants) - len(out) >= self.aggregator.threshold + 1:
            return
        for site in out:
            self.refusals.add(
                server_round,
                site,
                SiteError(
                    site=site,
                    status="refused",
                    rule="epsilon_max",
                    reason=f"its privacy budget covers {self.covers[site]} of the run's rounds "
                    "(said when it joined)",
                ),
            )
        self.refusals.end_if_refused(
            server_round,
            "train",
            f"{len(participants) - len(out)} site(s) have the budget "
            f"for it, {self.aggregator.threshold + 1} are needed for secure aggregation",
        )

    def fold(self, server_round: int, reply: Message) -> None:
        """Add one site's masked update to the round's sum as it arrives, and let it go."""
        assert self.aggregator is not None
        answer = SiteAnswer.of(reply)
        if not answer.ok or (answer.secagg is None and answer.unreadable is None):
            return
        site = self.site_of.get(answer.node, "?")
        try:
            if answer.unreadable is not None or answer.secagg is None:
                raise ValueError(answer.unreadable)
            update = MaskedUpdate.from_parts(answer.secagg.need("update"), answer.update())
            self.aggregator.add(update)
        except (SecAggError, KeyError, ValueError) as exc:
            self.folder.event(
                "update-rejected",
                round=server_round,
                site=site,
                reason=f"{type(exc).__name__}: {exc}",
            )
            return
        if answer.metrics:
            self._metrics.append(answer.metrics)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask what was folded (and ``replies``), hand the mean to the inner strategy."""
        assert self.aggregator is not None and self._global is not None
        for reply in replies:
            self.fold(server_round, reply)
        metrics, self._metrics = self._metrics, []
        try:
            status = self.aggregator.close_collection(server_round, deadline_passed=True)
            if status.needs_unmasking:
                self._unmask(server_round, status.unmask)
            mean_delta, total = self.aggregator.result(server_round)
        except (RecoveryError, SecAggError) as exc:
            self.folder.event("round-lost", round=server_round, reason=str(exc))
            self.refusals.end_if_refused(
                server_round, "train", "too few sites trained for secure aggregation"
            )
            return None, None
        self.folder.event(
            "secure-aggregation",
            round=server_round,
            mode=self.config.mode,
            survivors=list(status.survivors),
            dropped=list(status.dropped),
            error_bound=self.aggregator.error_bound(server_round),
        )
        mean = np.add(self._global, mean_delta, dtype=np.float32)  # rounded once, as in f64
        summary = {
            k: float(np.mean([m[k] for m in metrics]))
            for k in (set.intersection(*(set(m) for m in metrics)) if metrics else set())
            if k != wire.WEIGHT_KEY
        }
        combined = Message(
            RecordDict(
                {
                    wire.ARRAYS_KEY: ArrayRecord({WEIGHTS_KEY: vector_array(mean)}),
                    wire.METRICS_KEY: MetricRecord({**summary, wire.WEIGHT_KEY: total}),
                }
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        return self.inner.aggregate_train(server_round, [combined])

    def _unmask(self, server_round: int, requests: dict[str, Any]) -> None:
        assert self.aggregator is not None
        node_of = {s: n for n, s in self.site_of.items()}
        messages = [
            Message(
                RecordDict(
                    {
                        wire.CONFIG_KEY: ConfigRecord(
                            {
                                **self.run_entries,
                                **SiteInstruction(
                                    unmask=request.to_bytes(), server_round=server_round
                                ).entries(),
                            }
                        )
                    }
                ),
                dst_node_id=node_of[site],
                message_type=MessageType.QUERY,
            )
            for site, request in requests.items()
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            answer = SiteAnswer.of(reply)
            if not answer.ok or (answer.secagg is None and answer.unreadable is None):
                continue
            try:
                if answer.unreadable is not None or answer.secagg is None:
                    raise ValueError(answer.unreadable)
                self.aggregator.add_reveal(Reveal.from_bytes(answer.secagg.need("reveal")))
            except (SecAggError, KeyError, ValueError) as exc:
                self.folder.event("reveal-rejected", round=server_round, reason=str(exc))

    def end(self, status: str, *, timeout: float = 15.0) -> None:
        """Tell the sites that joined that the run ended early (``status``), best effort.

        A run that completes ends at each site with its last evaluation; one that the
        sites' refusals or a failure ended would otherwise leave its keys and its holds
        on their budgets until they expire.
        """
        if not self.site_of:
            return
        config = ConfigRecord({**self.run_entries, **SiteInstruction(run_ended=status).entries()})
        try:
            self.grid.send_and_receive(
                [
                    Message(
                        RecordDict({wire.CONFIG_KEY: config}),
                        dst_node_id=n,
                        message_type=MessageType.QUERY,
                    )
                    for n in self.site_of
                ],
                timeout=timeout,
            )
        except Exception as exc:  # noqa: BLE001 - the sites' holds then expire on their own
            self.folder.event("warning", reason=f"the sites were not told the run ended: {exc}")
