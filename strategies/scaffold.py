"""SCAFFOLD as a strategy plugin: one file, registered by name (``scaffold``).

Registered the way a researcher's strategy is, through the ``medfed.strategies`` entry
point group (``pyproject.toml``); docs/plugins.md walks through it as the worked example
of a strategy with client-side state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medfed.core.packing import WEIGHTS_KEY
from medfed.core.scaffold import server_control_update
from medfed.core.schema import SCAFFOLD_CONTROL_KEY, SiteInstruction


class Scaffold(FedAvg):
    """SCAFFOLD: FedAvg with control variates against client drift.

    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, option II of the control-variate update.

    What the server does: keeps the global control variate (as drift per local step,
    ``D = lr * c``, see :mod:`medfed.core.scaffold`) and sends it beside the model
    (ArrayRecord key ``scaffold-control``, packed like the model), with the fixed number
    of local steps ``local_steps`` (config ``local-steps``). After aggregating the
    weighted mean ``y_bar`` of the sites' models as FedAvg does, it updates
    ``D += |S|/N * ((x - y_bar) / K - D)``: the paper's ``c += 1/N sum_S delta c_i`` with
    FedAvg's example-count weights in place of the plain mean (``|S|`` sites trained
    this round, ``N`` sites connected).

    What the client must do (medfed's site worker does it, plain and DP-SGD alike):
    keep its own control variate ``D_i`` at the site, per run (never sent); train
    exactly ``local_steps`` steps, moving its parameters by ``-(D - D_i)`` after each
    (with plain SGD the paper's gradient ``g - c_i + c``; applied to the step so that
    Adam does not rescale it nor momentum accumulate it); then set
    ``D_i += (x - y_i) / K - D``. A site that cannot (DP-SGD planned for fewer steps)
    refuses the round under rule ``strategy.local_steps``; it never drops the correction.

    Secure aggregation and DP. Because every site takes the same K steps, the mean of
    the sites' control-variate changes follows from the aggregated model alone: nothing
    beyond the (masked) model update leaves a site, so it runs under secure
    aggregation, where the server only learns the weighted mean. Under DP-SGD the
    site's ``D_i`` is a function of its DP-trained models (post-processing: no further
    epsilon), and the correction is a constant applied after clipping and noise.

    Caveats. The theory is for local SGD; with Adam (the plain trainer's optimizer)
    ``D_i`` becomes the site's mean Adam step and the correction swaps it for the
    federation's mean step: the same idea, without the paper's proof. A site
    that drops out after training has still updated its ``D_i``, and the server counted
    it in ``|S|``: the two drift apart by that round's share until later rounds correct
    them.
    """

    #: The server's aggregation is FedAvg's weighted mean: medfed may stream it and
    #: secure aggregation may hand it the mean alone (server/streaming_mean.py).
    aggregates_weighted_mean = True

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        local_steps: int = 20,
    ) -> None:
        if isinstance(local_steps, bool) or int(local_steps) != local_steps or local_steps < 1:
            raise ValueError(f"local_steps={local_steps!r}: expected a whole number >= 1")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.local_steps = int(local_steps)
        #: The server control variate (drift per local step), packed like the model.
        self.control: np.ndarray | None = None
        self._sent: np.ndarray | None = None  # this round's global model x
        self._sampled = 0  # |S|
        self._connected = 0  # N

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each with the control variate and the number of local steps."""
        sent = arrays[WEIGHTS_KEY].numpy()
        if self.control is None or self.control.shape != sent.shape:
            self.control = np.zeros(sent.shape, dtype=np.float32)
        config.update(SiteInstruction(local_steps=self.local_steps).entries())
        with_control = ArrayRecord(
            {**dict(arrays.items()), SCAFFOLD_CONTROL_KEY: Array(self.control)}
        )
        messages = list(super().configure_train(server_round, with_control, config, grid))
        self._sent = sent.astype(np.float32)
        self._sampled = len(messages)
        self._connected = max(len(list(grid.get_node_ids())), self._sampled)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted mean; then the control variate from it (nothing else is needed)."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self._sent is not None and self.control is not None:
            self.control = server_control_update(
                self.control,
                self._sent,
                arrays[WEIGHTS_KEY].numpy(),
                local_steps=self.local_steps,
                sampled=self._sampled,
                total=self._connected,
            )
        self._sent = None  # the round's model is let go (and not saved with the state)
        return arrays, metrics
