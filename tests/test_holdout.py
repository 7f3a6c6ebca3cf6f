"""The held-out test split: subjects moved out of the sites, and a run scored on them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from medfed.client.site_local import SiteLocalStore
from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.runs import RunFolder
from medfed.data.sites import site_sources
from medfed.local.held_out import score_on_test
from medfed.synth import synthesize_sites
from medfed.synth.holdout import hold_out_test
from medfed.synth.sites import read_site_manifest
from medfed.tasks import engine, get_task
from medfed.tasks.adaptation import local_keys
from medfed.tasks.harmonization import harmonize


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    synthesize_sites(root / "pristine", sites=2, subjects_per_site=5, seed=3)
    return root


def _copy(synth, tmp_path):
    shutil.copytree(synth / "pristine", tmp_path / "data")
    return tmp_path / "data", tmp_path / "test"


def test_held_out_subjects_leave_the_sites_and_form_complete_sites(synth, tmp_path):
    data, test = _copy(synth, tmp_path)
    before = {s: read_site_manifest(data / s).series for s in ("site-1", "site-2")}
    chosen = hold_out_test(data, test, per_site=2, seed=0)
    for site in ("site-1", "site-2"):
        kept, held = read_site_manifest(data / site), read_site_manifest(test / site)
        assert len(held.series) == 2 and len(kept.series) == 3
        assert set(kept.series) | set(held.series) == set(before[site])
        assert not set(kept.series) & set(held.series)
        assert sorted(e.subject for e in held.series.values()) == chosen[site]
        for entry in held.series.values():
            assert (test / site / entry.dicom).is_dir() and (test / site / entry.label).is_file()
            assert not (data / site / entry.dicom).exists()
        # Both kinds of subject (lesion or not) are held out when the site has both.
        assert {e.lesion for e in held.series.values()} == {True, False}
    assert json.loads((test / "holdout.json").read_text())["subjects"] == chosen
    assert set(site_sources(test)) == {"site-1", "site-2"}


def test_the_choice_depends_on_the_seed_only(synth, tmp_path):
    a = hold_out_test(*_copy(synth, tmp_path / "a"), per_site=2, seed=4)
    b = hold_out_test(*_copy(synth, tmp_path / "b"), per_site=2, seed=4)
    c = [hold_out_test(*_copy(synth, tmp_path / f"c{s}"), per_site=2, seed=s) for s in range(4)]
    assert a == b
    assert any(x != a for x in c)


def test_holding_out_too_many_or_into_a_used_folder_is_refused(synth, tmp_path):
    data, test = _copy(synth, tmp_path)
    with pytest.raises(MedfedError, match="would leave 1") as err:
        hold_out_test(data, test, per_site=4, seed=0)
    assert "--subjects" in err.value.fix
    (test / "site-1").mkdir(parents=True)
    with pytest.raises(MedfedError, match="already holds"):
        hold_out_test(data, test, per_site=1, seed=0)
    assert len(read_site_manifest(data / "site-1").series) == 5  # nothing moved
    (data / "site-1" / "cache").mkdir()
    with pytest.raises(MedfedError, match="more than one format"):
        hold_out_test(data, tmp_path / "other", per_site=1, seed=0)


def _run_folder(tmp_path, **config):
    task = get_task("brain-tissue-seg")
    torch.manual_seed(1)
    model = task.build_model()
    run = RunConfig(task="brain-tissue-seg", rounds=2, secure_aggregation="off", **config)
    folder = RunFolder.create(tmp_path / "runs", 7, run)
    folder.save_checkpoint(2, engine.get_weights(model))
    return folder, task, model


def test_a_run_is_scored_on_every_test_subject(synth, tmp_path):
    data, test = _copy(synth, tmp_path)
    hold_out_test(data, test, per_site=2, seed=0)
    folder, task, model = _run_folder(tmp_path)
    scores = score_on_test(folder.path, site_sources(test), device=torch.device("cpu"))
    for site, src in site_sources(test).items():
        d = task.load_site_data(src)
        whole = engine.evaluate(task, model, ConcatDataset([d.train, d.val]), device="cpu")
        assert scores[site] == pytest.approx(whole)
        assert scores[site] != pytest.approx(engine.evaluate(task, model, d.val, device="cpu"))


def test_a_harmonized_run_maps_the_test_scans_onto_its_standard(synth, tmp_path):
    data, test = _copy(synth, tmp_path)
    hold_out_test(data, test, per_site=2, seed=0)
    folder, task, model = _run_folder(tmp_path, harmonization="histogram")
    standard = list(np.linspace(0.05, 1.0, 11))
    folder.event("harmonization", method="histogram", sites=["site-1"], standard=standard)
    src = site_sources(test)["site-2"]
    scores = score_on_test(folder.path, {"site-2": src}, device=torch.device("cpu"))
    mapped = harmonize(task.load_site_data(src), standard)
    expected = engine.evaluate(task, model, ConcatDataset([mapped.train, mapped.val]), device="cpu")
    assert scores["site-2"] == pytest.approx(expected)


def test_a_run_with_site_local_parameters_is_scored_with_each_sites_own(synth, tmp_path):
    data, test = _copy(synth, tmp_path)
    hold_out_test(data, test, per_site=2, seed=0)
    folder, task, model = _run_folder(tmp_path, adaptation="site-input-output")
    sources = site_sources(test)
    with pytest.raises(MedfedError, match="keeps no parameters") as err:
        score_on_test(folder.path, sources, device=torch.device("cpu"))
    assert "site_dirs" in err.value.fix
    local = local_keys(task, model, "site-input-output")
    torch.manual_seed(5)
    own = {k: v for k, v in engine.get_weights(task.build_model()).items() if k in local}
    SiteLocalStore(folder.path / "sites" / "site-1").save("7", own)
    SiteLocalStore(tmp_path / "elsewhere").save("7", engine.get_weights(model))
    scores = score_on_test(
        folder.path,
        sources,
        device=torch.device("cpu"),
        site_dirs={"site-2": tmp_path / "elsewhere"},
    )
    engine.set_weights(model, {**engine.get_weights(model), **own})
    d = task.load_site_data(sources["site-1"])
    whole = engine.evaluate(task, model, ConcatDataset([d.train, d.val]), device="cpu")
    assert scores["site-1"] == pytest.approx(whole)
    assert scores["site-1"] != pytest.approx(scores["site-2"])


def test_a_run_without_its_last_checkpoint_is_refused(tmp_path):
    folder, _, _ = _run_folder(tmp_path)
    folder.checkpoint_file(2).unlink()
    with pytest.raises(MedfedError, match="no checkpoint of its last round"):
        score_on_test(folder.path, {}, device=torch.device("cpu"))
