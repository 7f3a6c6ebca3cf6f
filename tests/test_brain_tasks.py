"""The brain MRI tasks on a synthesized DICOM site: manifest, subject split, shapes, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.data import DicomFolderSource, load_manifest
from medfed.data.targets import load_targets
from medfed.synth import read_site_manifest, synthesize_sites
from medfed.tasks import engine, get_task
from medfed.tasks.imaging import axial_slices, load_subjects, preprocess, split_subjects

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sites x 3 subjects, written once for the module."""
    out = tmp_path_factory.mktemp("brain") / "synth"
    synthesize_sites(out, sites=2, subjects_per_site=3, seed=7, lesion_fraction=0.5)
    return out


def _source(site: Path, **kwargs: object) -> DataSourceConfig:
    return DataSourceConfig(kind="dicom-folder", path=str(site), val_fraction=0.34, **kwargs)


def test_synth_manifest_is_a_data_manifest(sites: Path) -> None:
    site = sites / "site-1"
    synth = read_site_manifest(site)
    labels = load_manifest(site / "manifest.json")
    targets = load_targets(site / "manifest.json")
    assert set(labels) == set(synth.series) == set(targets)
    for uid, entry in synth.series.items():
        assert labels[uid] == (site / entry.label).resolve()
        assert targets[uid] == {"lesion": float(entry.lesion)}
    doc = json.loads((site / "manifest.json").read_text())
    assert doc["version"] == 1 and doc["label_names"]["3"] == "wm"
    source = DicomFolderSource(site, cache_dir=sites / "cache-1", manifest=site / "manifest.json")
    assert {s.label_source for s in source.series()} == {"manifest"}


def test_targets_are_optional_and_checked(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"version": 1, "labels": {}}))
    assert load_targets(plain) == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "labels": {}, "targets": {"1.2": {"lesion": "yes"}}}))
    with pytest.raises(MedfedError, match="targets are malformed"):
        load_targets(bad)


def test_split_is_by_subject_deterministic_and_stratified() -> None:
    keys = [f"uid-{i}" for i in range(10)]
    strata = [i % 2 for i in range(10)]
    train, val = split_subjects(keys, seed=3, val_fraction=0.4, strata=strata)
    assert len(val) == 4 and set(train) | set(val) == set(keys) and not set(train) & set(val)
    assert sum(strata[keys.index(k)] for k in val) == 2  # both classes, in proportion
    again = split_subjects(
        list(reversed(keys)), seed=3, val_fraction=0.4, strata=list(reversed(strata))
    )
    assert again == (train, val)
    assert split_subjects(keys, seed=4, val_fraction=0.4, strata=strata) != (train, val)
    assert split_subjects(keys[:2], seed=0, val_fraction=0.9) == (
        ["uid-0"],
        ["uid-1"],
    ) or split_subjects(keys[:2], seed=0, val_fraction=0.9) == (["uid-1"], ["uid-0"])
    with pytest.raises(MedfedError, match="at least 2 subjects"):
        split_subjects(keys[:1], seed=0, val_fraction=0.5)


@pytest.mark.parametrize("site_name", ["site-1", "site-2"])
def test_tissue_seg_loads_a_dicom_site_split_by_subject(sites: Path, site_name: str) -> None:
    task = get_task("brain-tissue-seg")
    data = task.load_site_data(_source(sites / site_name, seed=2))
    d = data.description
    assert (d["subjects-train"], d["subjects-val"], d["unlabelled"]) == (2, 1, 0)
    x, y = data.train[0]
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert y.shape == (1, 64, 64) and y.dtype == torch.int64
    xs, ys = data.train.tensors  # type: ignore[attr-defined]
    assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
    assert set(ys.unique().tolist()) == {0, 1, 2, 3}
    # No leakage: no validation slice is also a training slice.
    vx = data.val.tensors[0]  # type: ignore[attr-defined]
    train_rows = {hash(r.numpy().tobytes()) for r in xs if r.abs().sum() > 0}
    assert not any(hash(r.numpy().tobytes()) in train_rows for r in vx if r.abs().sum() > 0)
    # Each split holds exactly the slices of its subjects.
    source = _source(sites / site_name, seed=2)
    subjects = {s.key: s for s in load_subjects(source)}
    train_keys, val_keys = split_subjects(sorted(subjects), seed=2, val_fraction=0.34)
    n_slices = {
        k: len(axial_slices(*preprocess(s, pixdim=(3.0, 3.0, -1), spatial_size=(64, 64, -1)))[0])
        for k, s in subjects.items()
    }
    assert len(data.train) == sum(n_slices[k] for k in train_keys)
    assert len(data.val) == sum(n_slices[k] for k in val_keys)
    assert min(n_slices.values()) >= 30  # most axial slices of each scan


def test_lesion_cls_targets_come_from_the_manifest(sites: Path, tmp_path: Path) -> None:
    task = get_task("brain-lesion-cls")
    site = sites / "site-2"
    flags = sorted(int(e.lesion) for e in read_site_manifest(site).series.values())
    data = task.load_site_data(_source(site, seed=0))
    x, y = data.train[0]
    assert x.shape == (2, 40, 48, 40) and x.dtype == torch.float32  # image, asymmetry
    assert y.shape == (1,) and y.dtype == torch.float32
    ys_train = data.train.tensors[1][::2, 0].tolist()  # type: ignore[attr-defined]  # (+mirror)
    ys_val = data.val.tensors[1][:, 0].tolist()  # type: ignore[attr-defined]
    assert sorted(int(v) for v in ys_train + ys_val) == flags
    assert data.description["subjects-val"] == 1 and len(data.train) == 4
    # Flip the targets in the manifest: the task follows them.
    doc = json.loads((site / "manifest.json").read_text())
    doc["targets"] = {uid: {"lesion": 1 - t["lesion"]} for uid, t in doc["targets"].items()}
    copy = tmp_path / "site"
    copy.mkdir()
    shutil.copytree(site / "dicom", copy / "dicom")
    shutil.copytree(site / "labels", copy / "labels")
    (copy / "manifest.json").write_text(json.dumps(doc))
    flipped = task.load_site_data(_source(copy, seed=0))
    ys = flipped.train.tensors[1][::2, 0].tolist() + flipped.val.tensors[1][:, 0].tolist()  # type: ignore[attr-defined]
    assert sorted(int(v) for v in ys) == sorted(1 - f for f in flags)
    metrics = engine.evaluate(task, task.build_model(), data.val, device=CPU)
    assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0


def test_dicom_folder_without_path_is_a_clear_error() -> None:
    with pytest.raises(MedfedError, match="needs a folder"):
        load_subjects(DataSourceConfig(kind="dicom-folder", path=""))


def test_tissue_seg_short_training_reduces_loss(sites: Path) -> None:
    task = get_task("brain-tissue-seg")
    data = task.load_site_data(_source(sites / "site-1", seed=0))
    torch.manual_seed(0)
    model = task.build_model()
    before = engine.evaluate(task, model, data.train, device=CPU)["loss"]
    engine.train(
        task,
        model,
        data.train,
        epochs=2,
        batch_size=16,
        learning_rate=task.defaults.learning_rate,
        device=CPU,
        generator=torch.Generator().manual_seed(0),
    )
    after = engine.evaluate(task, model, data.train, device=CPU)
    assert after["loss"] < 0.8 * before
    assert after["dice"] > 0.3


def test_tissue_seg_metrics_pool_all_voxels() -> None:
    task = get_task("brain-tissue-seg")
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[0, 0, :4] = 1  # CSF only in slice 0
    target[1, 0, :4] = 2
    target[:, 0, 4:] = 3
    perfect = torch.nn.functional.one_hot(target[:, 0], 4).permute(0, 3, 1, 2).float()
    m = task.compute_metrics(perfect, target)
    assert m == {"dice-csf": 1.0, "dice-gm": 1.0, "dice-wm": 1.0, "dice": 1.0}
    m = task.compute_metrics(perfect.flip(0), target)  # CSF and GM swapped
    assert m["dice-csf"] == 0.0 and m["dice-wm"] == 1.0
