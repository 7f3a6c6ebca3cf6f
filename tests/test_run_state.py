"""Resuming a run: the strategy's state and the round loop pick up where a crash left them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy import Result

from medfed.core.config import RunConfig
from medfed.core.run_summary import RunSummary
from medfed.core.runs import RunFolder, find_run
from medfed.server.resume import resume_unfinished
from medfed.server.rounds import run_rounds
from medfed.server.run_state import ResumeError, RunStateStore

NODES = [11, 12, 13]


@pytest.fixture(autouse=True)
def _in_a_serverapp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the run of the process it runs in."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LearningGrid:
    """Sites that answer a train message with a deterministic function of the model."""

    def get_node_ids(self) -> list[int]:
        return NODES

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = []
        for m in list(messages):
            node = m.metadata.dst_node_id
            content = m.content
            if "arrays" in content:  # train: a step towards a site-specific target
                w = content["arrays"]["w"].numpy()
                new = w + 0.3 * (np.full_like(w, node / 10.0) - w)
                body = RecordDict(
                    {
                        "arrays": ArrayRecord({"w": Array(new)}),
                        "metrics": MetricRecord({"num-examples": node}),
                    }
                )
            else:
                body = RecordDict(
                    {"metrics": MetricRecord({"num-examples": node, "score": float(node)})}
                )
            replies.append(Message(body, reply_to=m))
        return replies


def _strategies() -> list[Any]:
    kw = {"min_train_nodes": 3, "min_evaluate_nodes": 3, "min_available_nodes": 3}
    return [
        fl.FedAvg(**kw),
        fl.FedAvgM(server_momentum=0.9, **kw),
        fl.FedAdam(eta=0.05, **kw),
        fl.FedYogi(eta=0.05, **kw),
    ]


def _run(
    strategy: Any,
    arrays: ArrayRecord,
    first: int,
    last: int,
    store: RunStateStore | None,
    result: Result | None = None,
) -> Result:
    def end(rnd: int, arr: ArrayRecord, so_far: Result) -> None:
        if store is not None:
            store.save(
                rnd,
                strategy,
                train_metrics=so_far.train_metrics_clientapp,
                evaluate_metrics=so_far.evaluate_metrics_clientapp,
            )

    return run_rounds(
        strategy,
        grid=LearningGrid(),
        arrays=arrays,
        first_round=first,
        num_rounds=last,
        timeout=1.0,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        end_of_round=end,
        result=result,
    )


@pytest.mark.parametrize("index", range(4), ids=["fedavg", "fedavgm", "fedadam", "fedyogi"])
def test_a_run_resumed_after_round_2_ends_where_an_uninterrupted_run_ends(
    tmp_path: Path, index: int
) -> None:
    start = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    random.seed(0)  # Flower samples the sites (and so orders their sum) with `random`
    whole = _run(_strategies()[index], start, 1, 4, None)

    first = _strategies()[index]
    store = RunStateStore(tmp_path)
    random.seed(0)
    half = _run(first, start, 1, 2, store)
    random.seed(1)  # whatever the new process's state: the saved one is restored
    # a new process: a fresh strategy, its state and the round-2 model read back
    state = store.load()
    assert state is not None and state.round == 2
    second = _strategies()[index]
    store.restore(state, second)
    so_far = Result()
    so_far.evaluate_metrics_clientapp.update(
        {int(r): MetricRecord(m) for r, m in state.evaluate_metrics.items()}
    )
    rest = _run(second, half.arrays, 3, 4, store, so_far)

    np.testing.assert_array_equal(rest.arrays["w"].numpy(), whole.arrays["w"].numpy())
    assert sorted(rest.evaluate_metrics_clientapp) == [1, 2, 3, 4]
    assert not np.array_equal(whole.arrays["w"].numpy(), start["w"].numpy())
    # only the last round's strategy file is kept
    assert [p.name for p in store.dir.glob("strategy-*.npz")] == ["strategy-round-004.npz"]


def test_state_of_another_strategy_is_refused(tmp_path: Path) -> None:
    start = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    store = RunStateStore(tmp_path)
    _run(_strategies()[2], start, 1, 1, store)  # FedAdam
    with pytest.raises(ResumeError, match="FedAdam"):
        store.restore(store.load(), _strategies()[1])  # FedAvgM


def test_unreadable_state_is_a_resume_error(tmp_path: Path) -> None:
    store = RunStateStore(tmp_path)
    assert store.load() is None  # nothing saved yet: the run starts from round 1
    store.dir.mkdir()
    store.state_file.write_text("{ torn")
    with pytest.raises(ResumeError) as err:
        store.load()
    assert str(store.state_file) in err.value.where


class FakeControl:
    """The SuperLink's Control API: records submissions and stops."""

    def __init__(self, stopped: set[int] = frozenset()) -> None:
        self.submitted: list[RunConfig] = []
        self.stops: list[int] = []
        self._stopped = stopped

    def submit(self, run: RunConfig) -> int:
        self.submitted.append(run)
        return 900 + len(self.submitted)

    def stop(self, run_id: int) -> bool:
        self.stops.append(run_id)
        return True

    def runs(self, run_id: int) -> list[Any]:
        from medfed.server.control import RunInfo

        sub = "stopped" if run_id in self._stopped else "failed"
        return [RunInfo(run_id, "finished", sub, "", "", "", "")]


def _folder(runs_dir: Path, run_id: int, *, summary: bool = False) -> RunFolder:
    folder = RunFolder.create(runs_dir, run_id, RunConfig(task="tiny-seg", rounds=4))
    folder.event("run-started", task="tiny-seg", strategy="fedavg", rounds=4)
    folder.event("round-finished", round=1, seconds=1.0, checkpoint="round-001.npz")
    if summary:
        folder.write_summary(RunSummary(status="completed", run_id=str(run_id)))
    return folder


def test_server_start_resubmits_lost_runs_and_ends_stopped_ones(tmp_path: Path) -> None:
    lost = _folder(tmp_path, 5)
    _folder(tmp_path, 6, summary=True)
    stopped = _folder(tmp_path, 7)
    control = FakeControl(stopped={7})
    outcomes = resume_unfinished(control, tmp_path, resume=True)  # type: ignore[arg-type]

    assert [(o.run_id, o.resumed_as) for o in outcomes] == [("5", 901), ("7", None)]
    assert [r.resume_of for r in control.submitted] == ["5"]
    assert control.submitted[0].rounds == 4
    assert control.stops == [5]  # the lost attempt, after the new one is named
    assert lost.attempt_ids() == ["5", "901"]
    assert find_run(tmp_path, 901).path == lost.path
    assert stopped.read_summary().status == "stopped"
    # a run a ServerApp holds is running, not lost: it is left alone
    with lost.lock():
        again = resume_unfinished(
            FakeControl(),
            tmp_path,  # type: ignore[arg-type]
            resume=True,
            release_wait=0.3,
        )
    assert again == []


def test_no_resume_ends_lost_runs_as_failed_with_the_reason(tmp_path: Path) -> None:
    lost = _folder(tmp_path, 5)
    outcomes = resume_unfinished(FakeControl(), tmp_path, resume=False)  # type: ignore[arg-type]
    assert outcomes[0].resumed_as is None
    summary = lost.read_summary()
    assert summary.status == "failed" and "--no-resume" in summary.reason
    assert summary.rounds_finished == 1


class Drifting(fl.FedAvg):
    """A researcher's strategy with state of its own: a control vector it updates."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.control: np.ndarray = np.zeros(5, dtype=np.float32)
        self.seen = 0

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        arrays, metrics = super().aggregate_train(server_round, replies)
        w = arrays["w"].numpy()
        self.control = 0.5 * self.control + w
        self.seen += 1
        return ArrayRecord({"w": Array(w - 0.1 * self.control)}), metrics


class Opaque(Drifting):
    """Its state in an object medfed cannot read: it says what to save."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.box = {"control": self.control}  # not arrays alone: configuration to medfed

    def state_dict(self) -> dict[str, Any]:
        return {"control": self.control, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control, self.seen = state["control"], state["seen"]


@pytest.mark.parametrize("cls", [Drifting, Opaque])
def test_a_plugin_strategys_own_state_is_resumed(tmp_path: Path, cls: type) -> None:
    kw = {"min_train_nodes": 3, "min_evaluate_nodes": 3, "min_available_nodes": 3}
    start = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    random.seed(0)
    whole = _run(cls(**kw), start, 1, 4, None)
    store = RunStateStore(tmp_path)
    random.seed(0)
    half = _run(cls(**kw), start, 1, 2, store)
    random.seed(1)
    second = cls(**kw)
    store.restore(store.load(), second)
    assert second.seen == 2
    rest = _run(second, half.arrays, 3, 4, store)
    np.testing.assert_array_equal(rest.arrays["w"].numpy(), whole.arrays["w"].numpy())
