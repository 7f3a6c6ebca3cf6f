"""The warm site worker: train/evaluate, policy refusals, audit records, bad requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.worker import SiteWorker, bind
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.errors import MedfedError
from medfed.core.packing import WEIGHTS_KEY, pack
from medfed.tasks import engine, get_task


def make_worker(tmp: Path, **policy: object) -> SiteWorker:
    cfg = validate(
        SiteConfig,
        {
            "site": {"name": "site-x"},
            "data": {"num_samples": 32},
            "policy": policy,
            "compute": {"threads": 1},
        },
        where="test",
    )
    return SiteWorker(cfg, tmp / "site.toml")


def global_weights(task: str = "tiny-seg") -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {WEIGHTS_KEY: pack(engine.get_weights(get_task(task).build_model()))}


def request(op: str, run: RunConfig, arrays: dict[str, np.ndarray], rnd: int = 1) -> wire.Frame:
    return wire.Frame(
        {
            "op": op,
            "run_id": 7,
            "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: rnd},
        },
        arrays,
    )


def test_train_returns_an_update_of_the_same_size_and_audits_it(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    run = RunConfig(secure_aggregation="off", task="tiny-seg")
    start = global_weights()
    reply = worker.handle(request("train", run, start))
    assert reply.header["ok"], reply.header
    update = reply.arrays[WEIGHTS_KEY]
    assert update.shape == start[WEIGHTS_KEY].shape
    assert not np.allclose(update, start[WEIGHTS_KEY])
    assert reply.header["metrics"]["num-examples"] == 24
    sent = [r for r in worker.audit.read() if r["event"] == "update-sent"]
    assert len(sent) == 1 and sent[0]["bytes"] == update.nbytes and sent[0]["round"] == 1


def test_evaluate_reports_task_metrics(tmp_path: Path) -> None:
    plain = RunConfig(secure_aggregation="off", task="tiny-seg")
    reply = make_worker(tmp_path).handle(request("evaluate", plain, global_weights()))
    assert reply.header["ok"]
    assert {"dice", "loss", "num-examples"} <= set(reply.header["metrics"])


def test_policy_refusal_is_explicit_and_logged(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, allowed_strategies=["fedavg"])
    krum = RunConfig(secure_aggregation="off", task="tiny-seg", strategy="krum")
    reply = worker.handle(request("train", krum, global_weights()))
    assert not reply.header["ok"]
    assert reply.header["status"] == "refused"
    assert reply.header["rule"] == "policy.allowed_strategies"
    assert "krum" in reply.header["reason"]
    assert worker.audit.read()[-1]["event"] == "refused"
    assert not reply.arrays


def test_unknown_task_and_bad_weights_fail_with_reason(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    typo = RunConfig(secure_aggregation="off", task="tiny-sge")
    reply = worker.handle(request("train", typo, global_weights()))
    assert reply.header["status"] == "failed" and "did you mean" in reply.header["reason"]
    reply = worker.handle(
        request(
            "train",
            RunConfig(secure_aggregation="off", task="tiny-seg"),
            {WEIGHTS_KEY: np.zeros(3, np.float32)},
        )
    )
    assert reply.header["status"] == "failed" and "model differs" in reply.header["reason"]
    reply = worker.handle(wire.Frame({"op": "train", "config": {}}))
    assert reply.header["status"] == "failed"


def test_socket_refuses_a_second_worker(short_tmp: Path) -> None:
    worker = make_worker(short_tmp)
    server = bind(worker, short_tmp / "w.sock")
    try:
        with pytest.raises(MedfedError, match="already running"):
            bind(worker, short_tmp / "w.sock")
        assert (short_tmp / "w.sock").stat().st_mode & 0o077 == 0
    finally:
        server.server_close()
