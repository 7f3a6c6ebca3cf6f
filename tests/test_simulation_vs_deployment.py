"""A simulation of 10 sites ends with the global model a deployment of the same 10 ends with.

The same run (tiny-seg, seed 5, every site every round, secure aggregation on) once
over 10 real site daemons on loopback and once in `medfed simulate`'s in-process
engine: both run the same ServerApp code and the same site training code on the
same data. The deployed sites each train on one torch thread (a LocalFederation's
share of 2 cores); the simulation is given one too, since a convolution's gradient
sums in another order on two threads (0.004 apart after 2 rounds). What is left to
differ is the order in which replies are summed: within the secure-aggregation
error bound the run reports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.core.config import RunConfig
from medfed.local import LocalFederation
from medfed.local.sim_sites import SimSite, synthetic_sites
from medfed.local.simulation import simulate

pytestmark = pytest.mark.slow

SITES = 10


def _final(folder: object, rounds: int) -> dict[str, np.ndarray]:
    with np.load(folder.checkpoint_file(rounds)) as z:  # type: ignore[attr-defined]
        return {k: z[k] for k in z.files}


def test_a_simulation_of_10_sites_ends_where_their_deployment_ends(short_tmp: Path) -> None:
    # A long round timeout: on a loaded 2-core machine the ten sites' first round (data
    # made, kernels prepared) can outlast 300 s, and a late site is dropped.
    run = RunConfig(
        task="tiny-seg",
        rounds=2,
        min_sites=SITES,
        seed=5,
        secure_aggregation="default",
        round_timeout_s=1200,
    )
    names = [f"site-{i + 1}" for i in range(SITES)]
    with LocalFederation(short_tmp / "deployed", names, name="same") as fed:
        fed.create(site_data=lambda i, name: {"num_samples": 24})
        fed.start(timeout=300)
        deployed_folder, deployed = fed.run(run, timeout=1800)
    sites = [
        SimSite(s.name, s.data.model_copy(update={"num_samples": 24}))
        for s in synthetic_sites(SITES)
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # in this process (the same model bit for bit as worker processes at the same
        # torch threads, simulate's docstring): two fewer processes importing torch
        simulated_folder, simulated = simulate(run, sites, short_tmp / "simulated", workers=1)
    finally:
        torch.set_num_threads(threads)
    assert deployed.status == simulated.status == "completed"
    assert deployed.sites == simulated.sites == sorted(names)
    aggregated = [e for e in deployed_folder.read_events() if e["event"] == "secure-aggregation"]
    assert [(len(e["survivors"]), e["dropped"]) for e in aggregated] == [(SITES, [])] * 2, (
        aggregated
    )  # every site in every round, or the models cannot match
    bound = sum(e["error_bound"] for e in aggregated)
    a, b = _final(deployed_folder, 2), _final(simulated_folder, 2)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= bound, f"largest difference {worst:.3g}, bound {bound:.3g}"
    assert any(np.any(a[k] != _final(deployed_folder, 1)[k]) for k in a)  # it trained
