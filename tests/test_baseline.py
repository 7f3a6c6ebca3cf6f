"""Baselines and the cross-site matrix (task-agnostic; tiny-seg keeps them fast)."""

from __future__ import annotations

import pytest
import torch

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.data.sites import site_sources
from medfed.tasks import get_task
from medfed.tasks.baseline import mean_over_sites, run_baseline


@pytest.fixture(scope="module")
def sites():
    task = get_task("tiny-seg")
    return task, {
        f"site-{i}": task.load_site_data(DataSourceConfig(seed=i, profile=i, num_samples=48))
        for i in range(3)
    }


def test_centralized_baseline_fills_the_matrix(sites) -> None:
    task, data = sites
    result = run_baseline(task, data, "centralized", epochs=2, device=torch.device("cpu"))
    assert list(result.matrix) == ["centralized"]
    assert set(result.matrix["centralized"]) == set(data)
    assert mean_over_sites(result.matrix, "dice")["centralized"] > 0.3


def test_local_baseline_has_one_model_per_site(sites) -> None:
    task, data = sites
    result = run_baseline(task, data, "local", epochs=1, device=torch.device("cpu"))
    assert sorted(result.matrix) == [f"local:site-{i}" for i in range(3)]
    for row in result.matrix.values():
        assert sorted(row) == sorted(data)


def test_site_sources_explains_an_empty_folder(tmp_path) -> None:
    with pytest.raises(MedfedError, match="medfed data synth"):
        site_sources(tmp_path)
