"""SCAFFOLD (strategies/scaffold.py): the control-variate math, the site's correction, a run."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import nn
from torch.utils.data import TensorDataset

from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.packing import WEIGHTS_KEY
from medfed.core.runs import RunFolder
from medfed.core.scaffold import server_control_update, site_control_update, step_correction
from medfed.core.schema import SCAFFOLD_CONTROL_KEY, SiteInstruction
from medfed.server.rounds import run_rounds
from medfed.server.streaming_mean import StreamingMean, streams
from medfed.strategies import STRATEGIES, build_strategy, strategy_options
from medfed.strategies.registry import check_options
from medfed.strategies.scaffold import Scaffold
from medfed.tasks import get_task
from medfed.tasks.base import Hyperparameters
from medfed.tasks.trainer import DpSgdTrainer, PlainTrainer, RoundOptions

NODES = [11, 12, 13, 14]


@pytest.fixture(autouse=True)
def _in_a_serverapp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the run of the process it runs in."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ------------------------------------------------------------------------ the math


@pytest.mark.parametrize("sampled", [3, 5])
def test_the_servers_update_equals_the_reference_from_every_sites_control(sampled: int) -> None:
    rng = np.random.default_rng(3)
    size, total, steps = 50, 5, 7
    x = rng.standard_normal(size).astype(np.float32)
    server = rng.standard_normal(size).astype(np.float32) * 0.1
    own = [rng.standard_normal(size).astype(np.float32) * 0.1 for _ in range(sampled)]
    trained = [x - rng.standard_normal(size).astype(np.float32) * 0.05 for _ in range(sampled)]
    weights = rng.integers(1, 100, sampled).astype(np.float64)
    p = weights / weights.sum()
    # each site's new control variate, as the site computes it
    new = [
        site_control_update({"w": o}, {"w": server}, {"w": x}, {"w": y}, local_steps=steps)["w"]
        for o, y in zip(own, trained, strict=True)
    ]
    reference = server + (sampled / total) * sum(
        pi * (n.astype(np.float64) - o) for pi, n, o in zip(p, new, own, strict=True)
    )
    y_bar = sum(pi * y.astype(np.float64) for pi, y in zip(p, trained, strict=True))
    got = server_control_update(server, x, y_bar, local_steps=steps, sampled=sampled, total=total)
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    # with equal weights it is the paper's c + 1/N sum_S (c_i+ - c_i)
    y_mean = np.mean(trained, axis=0, dtype=np.float64)
    paper = server + sum(n.astype(np.float64) - o for n, o in zip(new, own, strict=True)) / total
    np.testing.assert_allclose(
        server_control_update(server, x, y_mean, local_steps=steps, sampled=sampled, total=total),
        paper,
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_correction_is_the_difference_of_the_control_variates() -> None:
    got = step_correction({"w": np.array([0.1, 0.0])}, {"w": np.array([0.3, -0.2])})
    np.testing.assert_allclose(got["w"], [0.2, -0.2], rtol=1e-6)
    with pytest.raises(ValueError):
        server_control_update(
            np.zeros(2), np.zeros(2), np.zeros(2), local_steps=0, sampled=1, total=1
        )


class ScaffoldGrid:
    """Sites that run SCAFFOLD's site side on a quadratic each (their own optimum)."""

    def __init__(self, size: int, lr: float = 0.05) -> None:
        self.size, self.lr = size, lr
        self.own: dict[int, np.ndarray] = {n: np.zeros(size, np.float32) for n in NODES}
        self.optimum = {n: np.sin(np.arange(size, dtype=np.float32) * n) for n in NODES}

    def get_node_ids(self) -> list[int]:
        return NODES

    def send_and_receive(
        self, messages: Any, *, timeout: float | None = None, fold: Any = None
    ) -> list[Message]:
        replies = []
        for m in list(messages):
            node = m.metadata.dst_node_id
            if m.metadata.message_type == MessageType.TRAIN:
                asked = SiteInstruction.read(dict(m.content[wire.CONFIG_KEY]), {})
                x = m.content[wire.ARRAYS_KEY][WEIGHTS_KEY].numpy()
                control = m.content[wire.ARRAYS_KEY][SCAFFOLD_CONTROL_KEY].numpy()
                corr = step_correction({"w": self.own[node]}, {"w": control})["w"]
                y = x.copy()
                for _ in range(asked.local_steps):  # SGD on the site's quadratic, corrected
                    y -= self.lr * (y - self.optimum[node]) + corr
                self.own[node] = site_control_update(
                    {"w": self.own[node]},
                    {"w": control},
                    {"w": x},
                    {"w": y},
                    local_steps=asked.local_steps,
                )["w"]
                body = RecordDict(
                    {
                        wire.ARRAYS_KEY: ArrayRecord({WEIGHTS_KEY: Array(y.astype(np.float32))}),
                        wire.METRICS_KEY: MetricRecord({wire.WEIGHT_KEY: node}),
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


@pytest.mark.parametrize("streamed", [False, True])
def test_the_servers_control_variate_stays_the_weighted_mean_of_the_sites(
    tmp_path: Path, streamed: bool
) -> None:
    size = 64
    random.seed(0)
    strategy = Scaffold(
        local_steps=5, min_train_nodes=4, min_evaluate_nodes=4, min_available_nodes=4
    )
    assert streams(strategy)
    grid = ScaffoldGrid(size)
    run = (
        StreamingMean(
            strategy,
            size=size,
            folder=RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=3)),
        )
        if streamed
        else strategy
    )
    run_rounds(
        run,
        grid=grid,  # type: ignore[arg-type]
        arrays=ArrayRecord({WEIGHTS_KEY: Array(np.zeros(size, dtype=np.float32))}),
        first_round=1,
        num_rounds=3,
        timeout=1.0,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        end_of_round=lambda *a: None,
    )
    weights = np.array(NODES, dtype=np.float64) / sum(NODES)
    expected = sum(w * grid.own[n] for w, n in zip(weights, NODES, strict=True))
    assert strategy.control is not None and np.abs(strategy.control).max() > 1e-3
    np.testing.assert_allclose(strategy.control, expected, rtol=1e-4, atol=1e-6)


def test_the_train_message_carries_the_control_and_the_steps_but_the_global_record_not() -> None:
    strategy = Scaffold(local_steps=3, min_train_nodes=4, min_available_nodes=4)
    arrays = ArrayRecord({WEIGHTS_KEY: Array(np.ones(6, dtype=np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), ScaffoldGrid(6)))
    assert len(messages) == 4 and list(arrays) == [WEIGHTS_KEY]
    m = messages[0]
    np.testing.assert_array_equal(m.content[wire.ARRAYS_KEY][SCAFFOLD_CONTROL_KEY].numpy(), 0)
    assert SiteInstruction.read(dict(m.content[wire.CONFIG_KEY]), {}).local_steps == 3


# ------------------------------------------------------------------------ the registry


def test_scaffold_is_registered_by_name_with_its_options() -> None:
    assert "scaffold" in STRATEGIES.names()
    assert STRATEGIES.origin("scaffold").startswith("entry point")
    options = strategy_options("scaffold")
    assert options["local_steps"] == 20 and options["fraction_train"] == 1.0
    built = build_strategy("scaffold", {"local_steps": 4}, min_sites=3)
    assert isinstance(built, Scaffold) and built.min_train_nodes == 3
    with pytest.raises(ConfigError, match="did you mean 'local_steps'"):
        check_options("scaffold", {"local_step": 4})
    with pytest.raises(ValueError, match="local_steps"):
        Scaffold(local_steps=0)


# ------------------------------------------------------------------------ the site's loops


class _NoSignal(nn.Module):
    """A loss whose gradient is zero: only the correction moves the model."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (logits * 0.0).mean()


def _flat_task() -> Any:
    return dataclasses.replace(
        get_task("tiny-seg"),
        name="scaffold-test",
        build_model=lambda: nn.Linear(3, 2),
        build_loss=_NoSignal,
        defaults=Hyperparameters(weight_decay=0.0),
    )


def _data(n: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, generator=g), torch.zeros(n, 2))


def _correction(model: nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        n: (rng.standard_normal(tuple(p.shape)) + 0.5).astype(np.float32)
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_both_loops_move_a_model_without_gradient_by_exactly_the_correction(
    optimizer: str,
) -> None:
    task, steps = _flat_task(), 3
    trainers = {
        "plain": PlainTrainer(torch.device("cpu"), seed=1),
        "dp-sgd": DpSgdTrainer(  # no noise: only the correction may move it
            torch.device("cpu"), noise_multiplier=0.0, max_grad_norm=1.0, optimizer=optimizer
        ),
    }
    for name, trainer in trainers.items():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
        corr = _correction(model)
        options = RoundOptions(steps, 8, 0.01, local_steps=steps, step_correction=corr)
        stats = trainer.train(task, model, _data(), options)
        assert stats.steps == steps, name
        for n, p in model.named_parameters():
            np.testing.assert_allclose(
                p.detach().numpy(), before[n] - steps * corr[n], atol=1e-6, err_msg=name
            )


def test_the_correction_is_not_rescaled_by_adam() -> None:
    """With a gradient, Adam's step is at most about lr long; the correction comes on top."""
    task = dataclasses.replace(_flat_task(), build_loss=nn.MSELoss)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    corr = {n: np.full(tuple(p.shape), 0.5, np.float32) for n, p in model.named_parameters()}
    options = RoundOptions(1, 8, 0.01, local_steps=1, step_correction=corr)
    PlainTrainer(torch.device("cpu"), seed=1).train(task, model, _data(), options)
    for n, p in model.named_parameters():
        moved = before[n] - p.detach().numpy()
        assert np.all(np.abs(moved - 0.5) <= 0.0101)


def test_both_loops_take_exactly_the_strategys_local_steps() -> None:
    task = _flat_task()
    options = RoundOptions(1, 4, 0.01, local_steps=5)  # 2 batches an epoch: the data cycles
    plain = PlainTrainer(torch.device("cpu"), seed=1).train(task, nn.Linear(3, 2), _data(), options)
    assert plain.steps == 5
    dp = DpSgdTrainer(torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0)
    assert (
        dp.train(task, nn.Linear(3, 2), _data(), RoundOptions(3, 4, 0.01, local_steps=5)).steps == 5
    )


def test_dp_sgd_refuses_more_steps_than_its_budget_was_planned_for() -> None:
    dp = DpSgdTrainer(torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(MedfedError, match="local_steps"):
        dp.train(_flat_task(), nn.Linear(3, 2), _data(), RoundOptions(1, 4, 0.01, local_steps=3))


def test_a_correction_without_fixed_steps_or_for_unknown_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="local_steps"):
        RoundOptions(1, 4, 0.01, step_correction={"weight": np.zeros((2, 3))})
    options = RoundOptions(1, 4, 0.01, local_steps=1, step_correction={"nope": np.zeros(2)})
    with pytest.raises(ValueError, match="unknown parameters"):
        PlainTrainer(torch.device("cpu"), seed=1).train(
            _flat_task(), nn.Linear(3, 2), _data(), options
        )


# ------------------------------------------------------------------------ a simulated run


@pytest.mark.parametrize("dp", ["off", "sample"])
def test_a_simulated_scaffold_run_writes_metrics(tmp_path: Path, dp: str) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import SITES_DIR, simulate

    privacy = {"mode": dp} if dp == "off" else {"mode": dp, "noise_multiplier": 1.0}
    run = RunConfig.model_validate(
        {
            "task": "tiny-seg",
            "rounds": 2,
            "min_sites": 3,
            "seed": 5,
            "strategy": "scaffold",
            "strategy_options": {"local_steps": 2},
            "secure_aggregation": "off" if dp == "off" else "default",
            "privacy": privacy,
        }
    )
    folder, summary = simulate(run, synthetic_sites(3), tmp_path)
    assert summary.status == "completed", summary.reason
    train = [m for m in folder.read_metrics() if m["phase"] == "train" and m["site"] != "global"]
    assert {m["round"] for m in train} == {1, 2}
    assert all(m["steps"] == 2 for m in train)
    kept = sorted((folder.path / SITES_DIR).glob("*/site-local/run-*.scaffold.npz"))
    assert len(kept) == 3  # each site's own control variate, at the site
    assert json.loads(json.dumps(summary.strategy)) == "scaffold"


def test_medfed_simulate_runs_scaffold_under_dp_sgd(tmp_path: Path) -> None:
    from test_cli import medfed

    out = medfed(
        "simulate",
        "--task",
        "tiny-seg",
        "--sites",
        "3",
        "--rounds",
        "2",
        "--strategy",
        "scaffold",
        "-o",
        "local_steps=3",
        "--dp",
        "sample",
        "--noise-multiplier",
        "1.0",
        "--out",
        str(tmp_path / "runs"),
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "completed 2 rounds" in out.stdout
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "run.json").exists()]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train" and r["site"] != "global"]
    assert len(train) == 6 and all(r["steps"] == 3 and r["epsilon"] > 0 for r in train)


@pytest.mark.parametrize(
    ("privacy", "steps", "rule"),
    [
        ({"mode": "sample", "noise_multiplier": 1.0}, 100_000, "strategy.local_steps"),
        ({"mode": "update", "noise_multiplier": 1.0, "clipping_norm": 0.5}, 2, "privacy.mode"),
    ],
)
def test_a_site_refuses_what_its_dp_cannot_honour_by_rule(
    tmp_path: Path, privacy: dict[str, Any], steps: int, rule: str
) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import simulate

    run = RunConfig.model_validate(
        {
            "task": "tiny-seg",
            "rounds": 1,
            "min_sites": 2,
            "strategy": "scaffold",
            "strategy_options": {"local_steps": steps},
            "secure_aggregation": "off",
            "privacy": privacy,
        }
    )
    _, summary = simulate(run, synthetic_sites(2), tmp_path)
    assert summary.status == "refused" and rule in (summary.reason or "")


def test_a_resumed_scaffold_run_ends_where_an_uninterrupted_one_ends(tmp_path: Path) -> None:
    from medfed.server.run_state import RunStateStore

    size = 16
    kw = {"local_steps": 4, "min_train_nodes": 4, "min_evaluate_nodes": 4, "min_available_nodes": 4}

    def rounds(
        strategy: Scaffold,
        grid: ScaffoldGrid,
        arrays: ArrayRecord,
        first: int,
        last: int,
        store: RunStateStore | None = None,
    ) -> ArrayRecord:
        def end(rnd: int, arr: ArrayRecord, so_far: Any) -> None:
            if store is not None:
                store.save(rnd, strategy, train_metrics={}, evaluate_metrics={})

        result = run_rounds(
            strategy,
            grid=grid,  # type: ignore[arg-type]
            arrays=arrays,
            first_round=first,
            num_rounds=last,
            timeout=1.0,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
            end_of_round=end,
        )
        return result.arrays

    start = ArrayRecord({WEIGHTS_KEY: Array(np.zeros(size, dtype=np.float32))})
    random.seed(0)
    whole = rounds(Scaffold(**kw), ScaffoldGrid(size), start, 1, 4)
    store = RunStateStore(tmp_path)
    random.seed(0)
    sites = ScaffoldGrid(size)  # the sites keep their own control variates across it
    half = rounds(Scaffold(**kw), sites, start, 1, 2, store)
    second = Scaffold(**kw)
    store.restore(store.load(), second)
    assert second.control is not None and np.abs(second.control).max() > 0
    rest = rounds(second, sites, half, 3, 4, store)
    np.testing.assert_allclose(rest[WEIGHTS_KEY].numpy(), whole[WEIGHTS_KEY].numpy(), rtol=1e-6)


@pytest.mark.parametrize("secure", ["off", "default"])
def test_a_site_keeps_its_new_control_variate_only_with_an_update_that_may_leave(
    tmp_path: Path, secure: str
) -> None:
    from medfed.core.schema import LOCAL_STEPS_KEY, SCAFFOLD_CONTROL_KEY
    from tests.test_worker import global_weights, make_worker

    worker = make_worker(tmp_path)
    start = global_weights()
    run = RunConfig(task="tiny-seg", strategy="scaffold", secure_aggregation=secure)
    frame = wire.Frame(
        {
            "op": "train",
            "run_id": 7,
            "config": {
                wire.RUN_CONFIG_KEY: run.to_json(),
                wire.SERVER_ROUND_KEY: 1,
                LOCAL_STEPS_KEY: 2,
            },
        },
        {**start, SCAFFOLD_CONTROL_KEY: np.full_like(start[WEIGHTS_KEY], 1e-3)},
    )
    reply = worker.handle(frame)
    kept = worker.controls.load("7")
    if secure == "off":
        assert reply.header["ok"], reply.header
        assert kept is not None and any(np.abs(v).max() > 0 for v in kept.values())
    else:  # the site never joined the run's secure aggregation: masking fails, nothing
        # leaves, and the site's control variate stays where the server's believes it is
        assert not reply.header["ok"]
        assert kept is None
