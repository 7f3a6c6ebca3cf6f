"""The pooled anchor with site-specific capacity: tied shared parameters, per-site local ones."""

from __future__ import annotations

import pytest
import torch

from medfed.core.config import DataSourceConfig
from medfed.tasks import engine, get_task
from medfed.tasks.adaptation import local_keys
from medfed.tasks.site_specific import (
    evaluate_site_specific,
    site_models,
    train_site_specific,
)


@pytest.fixture(scope="module")
def sites():
    task = get_task("tiny-seg")
    return task, {
        f"site-{i}": task.load_site_data(DataSourceConfig(seed=i, profile=i, num_samples=32))
        for i in (1, 2)
    }


def test_shared_parameters_are_one_tensor_and_local_ones_are_each_sites(sites):
    task, data = sites
    models = site_models(task, "site-input-output", list(data), seed=0)
    a, b = models["site-1"], models["site-2"]
    local = local_keys(task, a, "site-input-output")
    assert local and len(local) < len(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        assert (sa[key].data_ptr() == sb[key].data_ptr()) is (key not in local), key
        assert torch.equal(sa[key], sb[key])  # both start from the same weights


def test_training_moves_the_shared_body_once_and_each_sites_own_blocks(sites):
    task, data = sites
    before = site_models(task, "site-input-output", list(data), seed=0)["site-1"].state_dict()
    models = train_site_specific(
        task,
        data,
        "site-input-output",
        epochs=2,
        batch_size=8,
        learning_rate=3e-3,
        device=torch.device("cpu"),
        seed=0,
    )
    local = local_keys(task, models["site-1"], "site-input-output")
    s1, s2 = models["site-1"].state_dict(), models["site-2"].state_dict()
    moved = [k for k in s1 if s1[k].is_floating_point() and not torch.equal(s1[k], before[k])]
    assert set(moved) & local and set(moved) - local
    for key in s1:
        if key in local and s1[key].is_floating_point():
            assert not torch.equal(s1[key], s2[key]), key
        else:
            assert torch.equal(s1[key], s2[key]), key
    scores = evaluate_site_specific(
        task, models, {s: d.val for s, d in data.items()}, device=torch.device("cpu")
    )
    assert set(scores) == set(data)
    fresh = site_models(task, "site-input-output", list(data), seed=0)["site-1"]
    untrained = engine.evaluate(task, fresh, data["site-1"].val, device=torch.device("cpu"))
    assert scores["site-1"]["loss"] < untrained["loss"]


def test_the_same_seed_trains_the_same_models(sites):
    task, data = sites
    kw = dict(epochs=1, batch_size=8, learning_rate=3e-3, device=torch.device("cpu"), seed=3)
    a = train_site_specific(task, data, "site-input-output", **kw)
    b = train_site_specific(task, data, "site-input-output", **kw)
    for key, value in a["site-2"].state_dict().items():
        assert torch.equal(value, b["site-2"].state_dict()[key])
