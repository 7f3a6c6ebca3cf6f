"""NIfTI sources (plain folder, MSD task, BIDS dataset) against the same site's DICOM folder."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfed.cli.main import main
from medfed.core.config import DataSourceConfig
from medfed.core.errors import ConfigError, MedfedError
from medfed.data import check_source_available
from medfed.data.nifti_source import NiftiSource
from medfed.synth import read_site_manifest, synthesize_sites
from medfed.synth.layouts import bids_label, nifti_image
from medfed.tasks import get_task
from medfed.tasks.imaging import load_subjects

LAYOUTS = {"nifti-folder": "nifti", "msd": "msd", "bids": "bids"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthesized site of 3 subjects in every layout."""
    out = tmp_path_factory.mktemp("layouts") / "synth"
    synthesize_sites(out, sites=1, subjects_per_site=3, seed=5, formats=("nifti", "msd", "bids"))
    return out / "site-1"


@pytest.fixture(scope="module")
def dicom_subjects(site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The DICOM folder's subjects by synthesized subject name."""
    names = {uid: e.subject for uid, e in read_site_manifest(site).series.items()}
    source = DataSourceConfig(
        kind="dicom-folder",
        path=str(site / "dicom"),
        manifest=str(site / "manifest.json"),
        cache_dir=str(tmp_path_factory.mktemp("dicom-cache")),
    )
    return {names[s.key]: s for s in load_subjects(source)}


def _copy(site: Path, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(site / layout, tmp_path / layout))


def _nifti(kind: str, path: Path, **kwargs: object) -> DataSourceConfig:
    return DataSourceConfig(
        kind=kind, path=str(path), cache_dir=str(path.parent / "cache"), **kwargs
    )


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_layout_gives_the_dicom_folders_voxels_labels_and_targets(
    kind: str, site: Path, dicom_subjects: dict, tmp_path: Path
) -> None:
    subjects = load_subjects(_nifti(kind, _copy(site, LAYOUTS[kind], tmp_path)))
    assert len(subjects) == len(dicom_subjects) == 3
    for s in subjects:
        name = next(n for n in dicom_subjects if s.key in (n, f"sub-{bids_label(n)}"))
        ref = dicom_subjects[name]
        assert torch.equal(s.image.as_tensor(), ref.image.as_tensor())
        assert torch.equal(s.label.as_tensor(), ref.label.as_tensor())
        assert s.image.dtype == torch.float32 and s.label.dtype == torch.int16
        # NIfTI stores its affine in float32: equal to the DICOM geometry within 1e-4 mm.
        assert torch.allclose(s.image.affine, ref.image.affine, atol=1e-4)
        assert s.targets == ref.targets and set(s.targets) == {"lesion"}
        assert s.patient == (f"sub-{bids_label(name)}" if kind == "bids" else name)


def test_second_load_reads_the_cache_and_a_changed_file_is_read_again(
    site: Path, tmp_path: Path
) -> None:
    root = _copy(site, "nifti", tmp_path)
    dataset = NiftiSource(_nifti("nifti-folder", root))
    entry = dataset.layout().entries[0]
    first, _ = dataset.load(entry)
    again = NiftiSource(_nifti("nifti-folder", root))
    second, _ = again.load(entry)
    assert again.cache.stats.hits == 1 and torch.equal(first.as_tensor(), second.as_tensor())
    image = root / entry.image
    img = nib.load(image)
    nib.save(nifti_image(np.asarray(img.dataobj) * 2, img.affine), image)
    third = NiftiSource(_nifti("nifti-folder", root))
    changed, _ = third.load(entry)
    assert third.cache.stats.hits == 0 and torch.equal(changed.as_tensor(), first.as_tensor() * 2)


def test_scan_reports_counts_and_each_bad_scan_with_its_reason(site: Path, tmp_path: Path) -> None:
    root = _copy(site, "nifti", tmp_path)
    entries = NiftiSource(_nifti("nifti-folder", root)).layout().entries
    a, b, c = (root / e.label for e in entries)
    small = nib.load(a)  # a label on another grid
    nib.save(nifti_image(np.asarray(small.dataobj)[:-2], small.affine), a)
    img = nib.load(b)  # a label of non-integer values
    nib.save(nifti_image(np.asarray(img.dataobj).astype(np.float32) + 0.5, img.affine), b)
    image_c = root / entries[2].image  # an image cut short
    raw = gzip.decompress(image_c.read_bytes())
    image_c.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    (root / "images" / "SYN-site1-009.nii.gz").write_bytes(b"not a nifti")
    report = NiftiSource(_nifti("nifti-folder", root)).scan()
    reasons = report.skipped_by_reason()
    assert reasons["label does not fit its image"] == 2  # the image and its label
    assert reasons["label is not integer"] == 2
    assert reasons["image data do not decode"] == 2
    assert reasons["not a readable NIfTI file"] == 1
    assert report.files_total == 7 and len(report.series) == 0
    # the report names no subject; paths only when asked for
    text = json.dumps(report.to_dict())
    assert "SYN" not in text and "SYN-site1" in json.dumps(report.to_dict(include_paths=True))
    with pytest.raises(MedfedError, match="cannot be used: label does not fit"):
        NiftiSource(_nifti("nifti-folder", root)).load(entries[0])


def test_msd_multimodal_takes_the_named_modality(site: Path, tmp_path: Path) -> None:
    root = _copy(site, "msd", tmp_path)
    doc = json.loads((root / "dataset.json").read_text())
    doc["modality"] = {"0": "FLAIR", "1": "T1w"}
    (root / "dataset.json").write_text(json.dumps(doc))
    for case in doc["training"]:  # 4-D: FLAIR = -image, T1w = image
        path = root / case["image"]
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        nib.save(nifti_image(np.stack([-data, data], axis=-1), img.affine), path)
    with pytest.raises(MedfedError, match="multi-modal .FLAIR, T1w.") as err:
        load_subjects(_nifti("msd", root))
    assert 'data.modality = "FLAIR"' in err.value.fix
    t1 = load_subjects(_nifti("msd", root, modality="t1w"))
    flair = load_subjects(_nifti("msd", root, modality="FLAIR"))
    assert [s.key for s in t1] == [s.key for s in flair]
    for t, f in zip(t1, flair, strict=True):
        assert torch.equal(f.image.as_tensor(), -t.image.as_tensor())
    with pytest.raises(MedfedError, match="no modality 'T2w'"):
        load_subjects(_nifti("msd", root, modality="T2w"))


def test_bids_sessions_of_one_subject_are_one_patient(site: Path, tmp_path: Path) -> None:
    root = _copy(site, "bids", tmp_path)
    sub = sorted(p.name for p in root.glob("sub-*"))[0]
    image = next((root / sub / "anat").glob("*_T1w.nii.gz"))
    label = next((root / "derivatives" / "medfed-synth" / sub / "anat").glob("*_dseg.nii.gz"))
    for ses in ("1", "2"):
        (root / sub / f"ses-{ses}" / "anat").mkdir(parents=True)
        shutil.copy(image, root / sub / f"ses-{ses}" / "anat" / f"{sub}_ses-{ses}_T1w.nii.gz")
        labels = root / "derivatives" / "medfed-synth" / sub / f"ses-{ses}" / "anat"
        labels.mkdir(parents=True)
        shutil.copy(label, labels / f"{sub}_ses-{ses}_dseg.nii.gz")
    (root / sub / "anat" / f"{sub}_FLAIR.nii.gz").write_bytes(image.read_bytes())
    with pytest.raises(MedfedError, match=r"several anatomical suffixes \(FLAIR, T1w\)"):
        load_subjects(_nifti("bids", root))
    with pytest.raises(MedfedError, match="no 'T2w' scans") as err:
        load_subjects(_nifti("bids", root, modality="T2w"))
    assert "FLAIR, T1w" in err.value.expected
    subjects = load_subjects(_nifti("bids", root, modality="T1w"))
    sessions = [s for s in subjects if s.patient == sub]
    assert sorted(s.key for s in sessions) == [sub, f"{sub}_ses-1", f"{sub}_ses-2"]
    assert all(s.label is not None and s.targets == sessions[0].targets for s in sessions)


def test_config_keys_belong_to_their_kind_and_a_missing_folder_is_named(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    with pytest.raises(ConfigError, match="data.images does not apply to data.kind = 'bids'"):
        check_source_available(config, DataSourceConfig(kind="bids", path="x", images="a"))
    with pytest.raises(ConfigError, match="BIDS dataset does not exist") as err:
        check_source_available(config, DataSourceConfig(kind="bids", path="missing"))
    assert "data.path = 'missing'" in err.value.where
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.nii.gz").write_bytes(b"")
    with pytest.raises(ConfigError, match="targets file does not exist"):
        check_source_available(config, DataSourceConfig(kind="msd", path="data", targets="t.tsv"))
    resolved = check_source_available(config, DataSourceConfig(kind="msd", path="data"))
    assert resolved.path == str(tmp_path / "data") and resolved.cache_dir == str(tmp_path / "cache")
    with pytest.raises(MedfedError, match="has no dataset.json"):
        load_subjects(resolved)


def test_site_scan_and_training_on_a_bids_site(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy(site, "bids", tmp_path)
    config = tmp_path / "site.toml"
    config.write_text('[site]\nname = "a"\n[data]\nkind = "bids"\npath = "bids"\n')
    with pytest.raises(SystemExit) as done:
        main(["site", "scan", "--config", str(config)])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "6 files: 6 used, 0 skipped; 3 series" in out
    assert "T1w" in out and "SYN" not in out
    report = json.loads((tmp_path / "scan-report.json").read_text())
    assert report["files_used"] == 6 and len(report["series"]) == 3
    task = get_task("brain-tissue-seg")
    data = task.load_site_data(_nifti("bids", root, val_fraction=0.34))
    assert data.description["subjects-train"] == 2 and data.description["subjects-val"] == 1


def test_synth_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(MedfedError, match="unknown format 'dcm'"):
        synthesize_sites(tmp_path / "x", sites=1, subjects_per_site=1, formats=("dcm",))
