"""Streaming aggregation: each update is summed as it arrives, with the mean Flower computes.

The weighted sum against the reference average (numpy, float64) and against Flower's
own strategies over whole runs; the server's memory for a round stays O(model).
"""

from __future__ import annotations

import gc
import random
import tracemalloc
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import strategy as fl

from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.packing import WEIGHTS_KEY, npy_bytes, npy_view
from medfed.core.runs import RunFolder
from medfed.core.weighted_sum import WeightedSum
from medfed.server.recording_grid import RecordingGrid
from medfed.server.rounds import run_rounds
from medfed.server.streaming_mean import StreamingMean, streams, vector_array

NODES = [11, 12, 13, 14]


@pytest.fixture(autouse=True)
def _in_a_serverapp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the run of the process it runs in."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_the_weighted_sum_equals_the_reference_average() -> None:
    rng = np.random.default_rng(7)
    size = 300_001
    updates = [rng.standard_normal(size, dtype=np.float32) for _ in range(6)]
    weights = [1.0, 16.0, 3.0, 250.0, 1.0, 7.5]
    total = WeightedSum(size)
    for x, w in zip(updates, weights, strict=True):
        total.add(np.frombuffer(x.tobytes(), dtype=np.float32), w)  # read-only, as received
    reference = np.average(np.stack(updates).astype(np.float64), axis=0, weights=weights)
    assert total.count == 6 and total.total == sum(weights)
    np.testing.assert_allclose(total.take_mean(), reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no update was added"):
        total.take_mean()  # handed over


@pytest.mark.parametrize(
    ("vector", "weight", "said"),
    [
        (np.zeros(9, dtype=np.float32), 1.0, "9 float32 values"),
        (np.zeros(10, dtype=np.int32), 1.0, "10 int32 values"),
        (np.zeros(10, dtype=np.float32), 0.0, "weighted 0.0"),
        (np.zeros(10, dtype=np.float32), float("nan"), "weighted nan"),
    ],
)
def test_a_malformed_update_is_refused_and_adds_nothing(
    vector: np.ndarray, weight: float, said: str
) -> None:
    total = WeightedSum(10)
    total.add(np.ones(10, dtype=np.float32), 2.0)
    with pytest.raises(ValueError, match=said):
        total.add(vector, weight)
    assert total.count == 1
    np.testing.assert_array_equal(total.take_mean(), np.ones(10, dtype=np.float32))


def test_npy_bytes_read_back_in_place_as_flower_writes_and_reads_them() -> None:
    v = np.arange(7, dtype=np.float32)
    assert npy_bytes(v) == Array(v).data
    view = npy_view(Array(v).data)
    np.testing.assert_array_equal(view, v)
    assert not view.flags.writeable and not view.flags.owndata
    np.testing.assert_array_equal(vector_array(v).numpy(), v)


def _reply(size: int, node: int, rng: np.random.Generator) -> Message:
    """A site's training reply as it arrives: the update's bytes, no array beside them."""
    update = vector_array(rng.standard_normal(size, dtype=np.float32))
    return Message(
        RecordDict(
            {
                wire.ARRAYS_KEY: ArrayRecord({WEIGHTS_KEY: update}),
                wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: node, "loss": node / 10}),
                wire.SITE_RECORD_KEY: ConfigRecord({"name": f"site-{node}"}),
            }
        ),
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )


def test_folding_a_round_holds_about_one_model_not_one_per_site(tmp_path: Path) -> None:
    size, sites = 400_000, 16
    rng = np.random.default_rng(1)
    stream = StreamingMean(fl.FedAvg(), size=size, folder=_folder(tmp_path))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for node in range(1, sites + 1):  # each reply arrives, is folded, and is let go
            stream.fold(1, _reply(size, node, rng))
        arrays, metrics = stream.aggregate_train(1, [])
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    model = 4 * size
    assert arrays is not None and metrics is not None
    assert metrics[wire.WEIGHT_KEY] == sum(range(1, sites + 1))
    # the sum, one reply, and that reply's array while it is made (this test's part)
    assert peak < 3.2 * model, f"peak {peak / model:.1f} models for {sites} sites"


def _folder(tmp_path: Path) -> RunFolder:
    return RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=3))


class TrainingGrid:
    """Sites that answer a train message with a deterministic step of the model."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_node_ids(self) -> list[int]:
        return NODES

    def send_and_receive(
        self, messages: Any, *, timeout: float | None = None, fold: Any = None
    ) -> list[Message]:
        replies = []
        for m in list(messages):
            node = m.metadata.dst_node_id
            if wire.ARRAYS_KEY in m.content and m.metadata.message_type == MessageType.TRAIN:
                w = m.content[wire.ARRAYS_KEY][WEIGHTS_KEY].numpy()
                target = np.sin(np.arange(self.size, dtype=np.float32) * node)
                body = RecordDict(
                    {
                        wire.ARRAYS_KEY: ArrayRecord({WEIGHTS_KEY: Array(w + 0.3 * (target - w))}),
                        wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: node, "loss": 1 / node}),
                    }
                )
            else:
                body = RecordDict({wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: node})})
            reply = Message(body, reply_to=m)
            if fold is not None:
                fold(reply)
            else:
                replies.append(reply)
        return replies


@pytest.mark.parametrize(
    "make",
    [
        lambda kw: fl.FedAvg(**kw),
        lambda kw: fl.FedProx(proximal_mu=0.1, **kw),
        lambda kw: fl.FedAvgM(server_momentum=0.9, **kw),
        lambda kw: fl.FedAdam(eta=0.05, **kw),
        lambda kw: fl.FedYogi(eta=0.05, **kw),
    ],
    ids=["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"],
)
def test_a_streamed_run_ends_where_flowers_strategy_ends(tmp_path: Path, make: Any) -> None:
    size = 1_000
    kw = {"min_train_nodes": 4, "min_evaluate_nodes": 4, "min_available_nodes": 4}
    results = []
    for streamed in (False, True):
        random.seed(0)  # Flower samples (and orders) the sites with `random`
        inner = make(kw)
        assert streams(inner)
        strategy = (
            StreamingMean(inner, size=size, folder=_folder(tmp_path / str(streamed)))
            if streamed
            else inner
        )
        start = ArrayRecord({WEIGHTS_KEY: Array(np.zeros(size, dtype=np.float32))})
        result = run_rounds(
            strategy,
            grid=TrainingGrid(size),
            arrays=start,
            first_round=1,
            num_rounds=3,
            timeout=1.0,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            end_of_round=lambda *a: None,
        )
        results.append(result)
    plain, streamed_result = results
    np.testing.assert_allclose(
        streamed_result.arrays[WEIGHTS_KEY].numpy(),
        plain.arrays[WEIGHTS_KEY].numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert streamed_result.train_metrics_clientapp[3]["loss"] == pytest.approx(
        plain.train_metrics_clientapp[3]["loss"]
    )


def test_only_strategies_that_aggregate_a_weighted_mean_stream() -> None:
    class OwnAggregation(fl.FedAvg):
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            return super().aggregate_train(server_round, replies)

    class DeclaredMean(OwnAggregation):
        aggregates_weighted_mean = True

    assert streams(fl.FedProx()) and streams(fl.FedAdagrad()) and streams(DeclaredMean())
    assert not streams(fl.FedMedian()) and not streams(fl.Krum())
    assert not streams(OwnAggregation())  # what it does with the replies is its own


def test_a_malformed_reply_is_recorded_and_left_out_of_the_mean(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    stream = StreamingMean(fl.FedAvg(), size=4, folder=folder)
    rng = np.random.default_rng(0)
    good = _reply(4, 3, rng)
    stream.fold(1, good)
    stream.fold(1, _reply(5, 2, rng))  # another model's size
    arrays, _ = stream.aggregate_train(1, [])
    assert arrays is not None
    np.testing.assert_allclose(
        arrays[WEIGHTS_KEY].numpy(), good.content[wire.ARRAYS_KEY][WEIGHTS_KEY].numpy()
    )
    rejected = [e for e in folder.read_events() if e["event"] == "update-rejected"]
    assert len(rejected) == 1 and rejected[0]["site"] == "site-2"
    assert "5 float32 values (shape (5,)), expected 4 float values" in rejected[0]["reason"]


class PullingGrid:
    """A SuperLink's grid: replies pulled by id; one node answers with an error."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pulls: list[int] = []
        self._sent: dict[str, Any] = {}

    def push_messages(self, messages: list[Any]) -> list[str]:
        for i, m in enumerate(messages):
            self._sent[f"m{i}"] = m
        return list(self._sent)

    def pull_messages(self, ids: list[str]) -> list[Any]:
        self.pulls.append(len(ids))
        out = []
        for mid in ids:
            node = self._sent[mid].metadata.dst_node_id
            meta = SimpleNamespace(src_node_id=node, reply_to_message_id=mid)
            if node == 13:
                out.append(
                    SimpleNamespace(
                        metadata=meta,
                        has_error=lambda: True,
                        error=SimpleNamespace(reason="ValueError: no data"),
                    )
                )
                continue
            reply = _reply(self.size, node, np.random.default_rng(node))
            out.append(
                SimpleNamespace(metadata=meta, has_error=lambda: False, content=reply.content)
            )
        return out


def test_a_folded_update_is_freed_when_folded_not_by_the_cyclic_collector(
    tmp_path: Path,
) -> None:
    # A RecordDict whose array_records was read sits in a reference cycle: without the
    # release, each folded update would live until the cyclic collector ran.
    grid = PullingGrid(size=1_000)
    recorder = RecordingGrid(grid, _folder(tmp_path))  # type: ignore[arg-type]
    recorder.expect_replies_of(300 << 20)
    folded: list[weakref.ref[Array]] = []

    def fold(reply: Any) -> None:
        assert reply.content.array_records  # read as a strategy reads it
        folded.append(weakref.ref(reply.content[wire.ARRAYS_KEY][WEIGHTS_KEY]))

    messages = [
        SimpleNamespace(
            metadata=SimpleNamespace(dst_node_id=n, message_type=MessageType.TRAIN),
            content={wire.CONFIG_KEY: {wire.SERVER_ROUND_KEY: 1}},
        )
        for n in NODES
    ]
    gc.disable()
    try:
        recorder.send_and_receive(messages, timeout=5.0, fold=fold)  # type: ignore[arg-type]
        assert len(folded) == 3
        assert [ref() for ref in folded] == [None, None, None]
    finally:
        gc.enable()


def test_the_recording_grid_folds_results_as_pulled_a_few_at_a_time(tmp_path: Path) -> None:
    grid = PullingGrid(size=1_000)
    recorder = RecordingGrid(grid, _folder(tmp_path))  # type: ignore[arg-type]
    recorder.expect_replies_of(300 << 20)  # larger than the pull budget: one at a time
    folded: list[str] = []
    messages = [
        SimpleNamespace(
            metadata=SimpleNamespace(dst_node_id=n, message_type=MessageType.TRAIN),
            content={wire.CONFIG_KEY: {wire.SERVER_ROUND_KEY: 1}},
        )
        for n in NODES
    ]
    kept = recorder.send_and_receive(
        messages,
        timeout=5.0,  # type: ignore[arg-type]
        fold=lambda r: folded.append(str(r.content[wire.SITE_RECORD_KEY]["name"])),
    )
    assert folded == ["site-11", "site-12", "site-14"]
    assert [r.metadata.src_node_id for r in kept] == [13]  # the error, for the strategy
    assert grid.pulls == [1, 1, 1, 1]
    assert recorder.sites_seen == {"site-11", "site-12", "site-14"}
