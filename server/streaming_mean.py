"""Plain aggregation that folds each site's update in as it arrives (O(model) memory).

Flower's mean strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad)
take every reply of a round at once, so a server holds sites x model bytes before
it adds anything. :class:`StreamingMean` wraps such a strategy: the round loop
(:mod:`medfed.server.rounds`) hands it each reply as it is pulled
(:meth:`StreamingMean.fold`), the update is added into one
:class:`~medfed.core.weighted_sum.WeightedSum` and let go; at the end of the round
the inner strategy gets ONE reply carrying the weighted mean and the total weight,
which gives it the mean it would have computed (as secure aggregation does,
:mod:`medfed.server.secure_aggregation`). For FedAvg (and FedProx) that mean is the
new global model, so the inner strategy is not called at all.

Only strategies whose aggregation is that weighted mean are wrapped (:func:`streams`);
others (FedMedian, Krum, a researcher's own ``aggregate_train``) keep every reply,
as Flower does. A researcher's strategy that only changes the mean's use (a server
optimizer, say) may declare ``aggregates_weighted_mean = True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi, Strategy

from medfed.core import wire
from medfed.core.packing import WEIGHTS_KEY, npy_bytes
from medfed.core.runs import RunFolder
from medfed.core.weighted_sum import WeightedSum
from medfed.server.site_replies import SiteAnswer
from medfed.server.wrapped_strategy import WrappedStrategy

#: ``aggregate_train`` methods that compute the weighted mean of the replies (and use it).
MEAN_AGGREGATIONS = frozenset(
    c.aggregate_train for c in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
)


def streams(strategy: Strategy) -> bool:
    """True if ``strategy`` aggregates a round as the weighted mean of its replies."""
    return (
        type(strategy).aggregate_train in MEAN_AGGREGATIONS
        or getattr(strategy, "aggregates_weighted_mean", False) is True
    )


def vector_array(vector: np.ndarray) -> Array:
    """A Flower ``Array`` of a flat vector, its bytes copied once."""
    return Array(
        dtype=str(vector.dtype),
        shape=(int(vector.size),),
        stype=SType.NUMPY,
        data=npy_bytes(vector),
    )


class StreamingMean(WrappedStrategy):
    """Wraps a mean strategy ``inner`` so that a round's updates are summed as they come."""

    def __init__(self, inner: Strategy, *, size: int, folder: RunFolder) -> None:
        super().__init__(inner)
        self.size = size
        self.folder = folder
        self._sum = WeightedSum(size)
        self._metrics: dict[str, float] = {}  # weighted sums of each metric
        self._metric_keys: set[str] | None = None  # the keys every reply carried

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's messages; a new sum for the round."""
        self._sum = WeightedSum(self.size)
        self._metrics, self._metric_keys = {}, None
        return self.inner.configure_train(server_round, arrays, config, grid)

    def fold(self, server_round: int, reply: Message) -> None:
        """Add one site's reply to the round's sum; a malformed update is recorded, not used."""
        answer = SiteAnswer.of(reply)
        if not answer.ok:
            return
        said = answer.metrics
        try:
            if answer.unreadable is not None:
                raise ValueError(answer.unreadable)
            weight = float(said[wire.WEIGHT_KEY])
            self._sum.add(answer.update(), weight)
        except (KeyError, ValueError, TypeError) as exc:
            self.folder.event(
                "update-rejected",
                round=server_round,
                site=answer.name(),
                reason=f"{type(exc).__name__}: {exc}",
            )
            return
        numeric = {
            k: float(v)
            for k, v in said.items()
            if k != wire.WEIGHT_KEY and isinstance(v, int | float)
        }
        self._metric_keys = (
            set(numeric) if self._metric_keys is None else self._metric_keys & set(numeric)
        )
        for key, value in numeric.items():
            self._metrics[key] = self._metrics.get(key, 0.0) + weight * value

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weighted mean of what was folded (and of ``replies``, if any are given)."""
        for reply in replies:
            self.fold(server_round, reply)
        if self._sum.count == 0:
            return None, None
        total = self._sum.total
        metrics: dict[str, Any] = {
            k: self._metrics[k] / total for k in sorted(self._metric_keys or ())
        }
        metrics[wire.WEIGHT_KEY] = total
        mean = ArrayRecord({WEIGHTS_KEY: vector_array(self._sum.take_mean())})
        self._sum = WeightedSum(self.size)
        if type(self.inner).aggregate_train is FedAvg.aggregate_train:
            return mean, MetricRecord(metrics)  # FedAvg's own result: the mean
        combined = Message(
            RecordDict({wire.ARRAYS_KEY: mean, wire.METRICS_KEY: MetricRecord(metrics)}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        return self.inner.aggregate_train(server_round, [combined])
