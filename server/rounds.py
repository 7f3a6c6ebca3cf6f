"""The round loop of a run, from any round: Flower's ``Strategy.start`` loop, resumable.

Flower's ``Strategy.start`` always begins at round 1. A run resumed after a server
crash begins after its last completed round, with the strategy's state restored
(:mod:`medfed.server.run_state`); the loop is otherwise the same: configure and
aggregate training, then evaluation, then the end-of-round hook, every round. A
strategy with a ``fold(round, reply)`` method (:mod:`medfed.server.streaming_mean`,
secure aggregation) is handed each training reply as it arrives, on a grid that
supports it (:class:`medfed.server.recording_grid.RecordingGrid`).
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

#: Called after each round with (round, the global arrays, the result so far).
EndOfRound = Callable[[int, ArrayRecord, Result], None]


def run_rounds(
    strategy: Strategy,
    *,
    grid: Grid,
    arrays: ArrayRecord,
    first_round: int,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    end_of_round: EndOfRound,
    result: Result | None = None,
) -> Result:
    """Rounds ``first_round`` .. ``num_rounds`` of ``strategy``; returns the result.

    ``result``: what earlier rounds produced (a resumed run's metrics so far).
    """
    result = Result() if result is None else result
    result.arrays = arrays
    for rnd in range(first_round, num_rounds + 1):
        messages = strategy.configure_train(rnd, arrays, train_config, grid)
        fold = getattr(strategy, "fold", None)
        if fold is not None:  # streaming: each update is summed as it arrives, then let go
            replies = grid.send_and_receive(
                messages,
                timeout=timeout,  # type: ignore[call-arg]
                fold=functools.partial(fold, rnd),
            )
        else:
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
        del messages  # they hold the round's global model; the result holds it from here
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            result.arrays = arrays = new_arrays
        # Flower's records hold themselves in reference cycles (their synced dicts call
        # back bound methods): the round's messages, and the model they carry, are freed
        # by the cyclic collector only. Collect now, so the last global model goes here.
        del replies, new_arrays
        gc.collect()
        if train_metrics is not None:
            result.train_metrics_clientapp[rnd] = train_metrics
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(rnd, arrays, evaluate_config, grid),
            timeout=timeout,
        )
        evaluate_metrics = strategy.aggregate_evaluate(rnd, replies)
        if evaluate_metrics is not None:
            result.evaluate_metrics_clientapp[rnd] = evaluate_metrics
        end_of_round(rnd, arrays, result)
    return result
