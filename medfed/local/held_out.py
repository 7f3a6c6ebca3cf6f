"""Score a finished run's global model on held-out test data, as each site would.

Benchmarks choose recipes on the sites' validation splits (``cross_site.json``) and
report the chosen run's score on a test split that no run read
(:func:`medfed.synth.holdout.hold_out_test`). The model is the run's last checkpoint;
a harmonized run's test scans are mapped onto the standard landmarks the sites agreed
on (the ``harmonization`` event), each scan by its own landmarks, as the sites map
theirs. Under a domain-adaptation hook each site's model is the global checkpoint with
the site's own parameters (``site-local/run-<id>.npz`` in the site's folder; a
simulated run keeps its sites' folders under ``<run>/sites/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from medfed.client.site_local import SiteLocalStore
from medfed.core.config import DataSourceConfig, RunConfig
from medfed.core.errors import MedfedError
from medfed.core.runs import RunFolder
from medfed.tasks import engine, get_task
from medfed.tasks.harmonization import harmonize


def _final_weights(folder: RunFolder, rounds: int) -> dict[str, np.ndarray]:
    path = folder.checkpoint_file(rounds)
    if not path.is_file():
        raise MedfedError(
            "the run has no checkpoint of its last round",
            where=str(path),
            expected=f"checkpoints/round-{rounds:03d}.npz of a completed run",
            fix="score a run that completed",
        )
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _standard(folder: RunFolder) -> list[float]:
    for event in folder.read_events():
        if event.event == "harmonization":
            return list(event.get("standard"))
    raise MedfedError(
        "a harmonized run without its harmonization event",
        where=str(folder.events_file),
        expected="a 'harmonization' event with the standard landmarks",
    )


def _site_local(site_dir: Path, run_id: str, adaptation: str) -> dict[str, np.ndarray]:
    store = SiteLocalStore(site_dir)
    params = store.load(run_id)
    if params is None:
        raise MedfedError(
            f"the site keeps no parameters of this {adaptation!r} run",
            where=str(store.path(run_id)),
            expected="the site's own parameters, written by its last training round",
            fix="pass the site's folder (site_dirs) of the site that trained in this run",
        )
    return params


def score_on_test(
    run_dir: Path,
    test_sources: dict[str, DataSourceConfig],
    *,
    device: torch.device | None = None,
    site_dirs: dict[str, Path] | None = None,
) -> dict[str, dict[str, float]]:
    """The run's final model at every site, evaluated on the site's test data (all of it).

    ``site_dirs``: where each site keeps its own parameters, for a run under an
    adaptation hook (default: the simulated sites' folders, ``<run_dir>/sites/<site>``).
    """
    folder = RunFolder(Path(run_dir))
    info = folder.read_run()
    run = RunConfig.model_validate(info["config"])
    task = get_task(run.task)
    device = device or engine.select_device()
    model = task.build_model()
    global_weights = _final_weights(folder, run.rounds)
    if run.adaptation == "none":
        engine.set_weights(model, global_weights)
    standard = _standard(folder) if run.harmonization != "off" else None
    scores = {}
    for site, source in test_sources.items():
        if run.adaptation != "none":
            site_dir = (site_dirs or {}).get(site, folder.path / "sites" / site)
            own = _site_local(Path(site_dir), str(info["run_id"]), run.adaptation)
            engine.set_weights(model, {**global_weights, **own})
        data = task.load_site_data(source)
        if standard is not None:
            data = harmonize(data, standard)
        scores[site] = engine.evaluate(
            task, model, ConcatDataset([data.train, data.val]), device=device
        )
    return scores
