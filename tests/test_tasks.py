"""The task contract, checked for every registered task; training reduces the loss."""

from __future__ import annotations

import pytest
import torch

from medfed.core.config import DataSourceConfig
from medfed.tasks import TASKS, engine, get_task


@pytest.mark.parametrize("name", TASKS.names())
def test_task_contract(name: str) -> None:
    task = get_task(name)
    model = task.build_model()
    bad = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert not bad, "task models must be DP-compatible (no BatchNorm)"
    data = task.load_site_data(DataSourceConfig(num_samples=16, seed=1))
    assert len(data.train) > 0 and len(data.val) > 0
    metrics = engine.evaluate(task, model, data.val, device=torch.device("cpu"))
    assert task.primary_metric in metrics and "loss" in metrics
    assert task.defaults.batch_size > 0 and task.defaults.learning_rate > 0


def test_short_training_reduces_loss() -> None:
    task = get_task("tiny-seg")
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_site_data(DataSourceConfig(num_samples=64, seed=3))
    before = engine.evaluate(task, model, data.train, device=torch.device("cpu"))["loss"]
    engine.train(
        task,
        model,
        data.train,
        epochs=3,
        batch_size=16,
        learning_rate=1e-2,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    after = engine.evaluate(task, model, data.train, device=torch.device("cpu"))["loss"]
    assert after < 0.8 * before


def test_select_device_prefers_cuda_only_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engine.select_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        engine.select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine.select_device("auto").type == "cuda"
    assert engine.select_device("cpu").type == "cpu"
