"""A strategy around another: it changes how training rounds aggregate, nothing else.

Streaming aggregation (:mod:`medfed.server.streaming_mean`) and secure aggregation
(:mod:`medfed.server.secure_aggregation`) wrap the run's strategy this way: the
global model is not secret, so evaluation and the summary are the inner strategy's.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class WrappedStrategy(Strategy):
    """Delegates evaluation and the summary to ``inner``; subclasses own training."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's evaluation messages."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The inner strategy's evaluation metrics."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """The inner strategy's summary."""
        self.inner.summary()
