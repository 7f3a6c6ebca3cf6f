"""Domain-adaptation hooks: site-local parameters are trained at the site and never sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client.worker import SiteWorker
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.errors import MedfedError, UnknownNameError
from medfed.core.packing import WEIGHTS_KEY, pack, shared_state
from medfed.tasks import engine, get_task
from medfed.tasks.adaptation import ADAPTATIONS, local_keys


def make_worker(tmp: Path) -> SiteWorker:
    cfg = validate(
        SiteConfig,
        {"site": {"name": "site-x"}, "data": {"num_samples": 32}, "compute": {"threads": 1}},
        where="test",
    )
    return SiteWorker(cfg, tmp / "site.toml")


def initial(task: str, local: frozenset[str]) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return shared_state(engine.get_weights(get_task(task).build_model()), local)


def request(op: str, run: RunConfig, vector: np.ndarray, rnd: int) -> wire.Frame:
    return wire.Frame(
        {
            "op": op,
            "run_id": 11,
            "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: rnd},
        },
        {WEIGHTS_KEY: vector},
    )


@pytest.mark.parametrize("task_name", ["tiny-seg", "brain-tissue-seg", "brain-lesion-cls"])
def test_every_task_declares_blocks_that_exist(task_name: str) -> None:
    task = get_task(task_name)
    model = task.build_model()
    inp = local_keys(task, model, "site-input-block")
    both = local_keys(task, model, "site-input-output")
    assert inp and inp < both < set(model.state_dict())
    assert local_keys(task, model, "none") == frozenset()


def test_fedbn_keeps_norm_affine_parameters_and_refuses_a_model_without_them() -> None:
    task = get_task("brain-lesion-cls")
    keys = local_keys(task, task.build_model(), "fedbn")
    assert keys and all(".norm" in k and k.endswith((".weight", ".bias")) for k in keys)
    tissue = get_task("brain-tissue-seg")
    with pytest.raises(MedfedError, match="no normalization parameters"):
        local_keys(tissue, tissue.build_model(), "fedbn")


def test_unknown_hook_gets_did_you_mean() -> None:
    task = get_task("tiny-seg")
    with pytest.raises(UnknownNameError, match="did you mean 'fedbn'"):
        local_keys(task, task.build_model(), "fedbm")
    assert {"none", "fedbn", "site-input-block", "site-input-output"} <= set(ADAPTATIONS.names())


def test_site_local_parameters_never_leave_and_persist_across_rounds(tmp_path: Path) -> None:
    task = get_task("tiny-seg")
    local = local_keys(task, task.build_model(), "site-input-block")
    run = RunConfig(task="tiny-seg", secure_aggregation="off", adaptation="site-input-block")
    start = initial("tiny-seg", local)
    worker = make_worker(tmp_path)

    reply = worker.handle(request("train", run, pack(start), rnd=1))
    assert reply.header["ok"], reply.header
    # Only the shared part travels: the vector is exactly the shared layout's size.
    assert reply.arrays[WEIGHTS_KEY].size == pack(start).size
    stored = worker.site_local.load("11")
    assert stored is not None and set(stored) == set(local)
    torch.manual_seed(0)
    fresh = engine.get_weights(task.build_model())
    assert any(not np.allclose(stored[k], fresh[k]) for k in local)  # trained at the site

    # A new worker (a daemon restart) picks the site's own parameters up from disk.
    restarted = make_worker(tmp_path)
    reply = restarted.handle(request("evaluate", run, reply.arrays[WEIGHTS_KEY], rnd=1))
    assert reply.header["ok"], reply.header
    model_state = engine.get_weights(restarted.model_for(task))
    for k in local:
        np.testing.assert_array_equal(model_state[k], stored[k])


def test_a_full_vector_is_refused_when_the_run_keeps_parameters_local(tmp_path: Path) -> None:
    run = RunConfig(task="tiny-seg", secure_aggregation="off", adaptation="site-input-output")
    torch.manual_seed(0)
    full = pack(engine.get_weights(get_task("tiny-seg").build_model()))
    reply = make_worker(tmp_path).handle(request("train", run, full, rnd=1))
    assert reply.header["status"] == "failed" and "model differs" in reply.header["reason"]
