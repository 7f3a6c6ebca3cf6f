"""Shared pieces of the brain MRI tasks: a site's subjects, the subject split, preprocessing.

A *subject* is one image series (one scan) with its label volume and targets.
Both brain tasks read subjects the same way:

``kind = "dicom-folder"``
    ``source.path`` is the site's folder. Its series are read with
    :class:`medfed.data.DicomFolderSource` (decoded once, then read from
    ``cache_dir``, by default the folder's ``.medfed-cache``); labels and per-series
    targets come from ``manifest``, by default ``<path>/manifest.json`` when present
    (see :mod:`medfed.data.labels` and :mod:`medfed.data.targets`). A site written by
    ``medfed data synth`` is such a folder (``DIR/site-N``).
``kind = "nifti-folder"``, ``"msd"``, ``"bids"``
    A NIfTI dataset in that layout, read with :class:`medfed.data.nifti_source.NiftiSource`
    (cached the same way); the subject (BIDS: ``sub-<label>``) is the patient, targets
    come from ``targets.json`` (BIDS: ``participants.tsv``).
``kind = "dicomweb"``
    The series a PACS holds for ``[data.pacs.query]``, fetched into the cache and read as
    a DICOM folder (:mod:`medfed.data.dicomweb`).
``kind = "synthetic"``
    ``max(2, num_samples // SAMPLES_PER_SYNTHETIC_SUBJECT)`` subjects are
    synthesized in memory with :mod:`medfed.synth`, as site ``profile`` of the
    benchmark with seed ``seed``, half of them with a lesion. So
    ``num_samples = 16`` gives 2 subjects (about 3 s, most of it reading the
    template once per process) and the default 64 gives 8.

Train and validation are split by subject, never by slice, so no scan has
slices on both sides (:func:`split_subjects`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from monai.utils import SpaceKeys

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.tasks.bias_field import n4_correct

if TYPE_CHECKING:
    from medfed.synth import SubjectVolume

#: A site folder's manifest (labels and targets), relative to ``DataSourceConfig.path``.
MANIFEST_NAME = "manifest.json"
#: ``kind = "synthetic"``: one subject per this many ``num_samples`` (at least 2 subjects).
SAMPLES_PER_SYNTHETIC_SUBJECT = 8
_SPLIT_STREAM = 0x5B117
log = logging.getLogger("medfed.tasks")
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Subject:
    """One scan of a site.

    Attributes
    ----------
    key : str
        SeriesInstanceUID (or ``synthetic-NNN``); stays at the site.
    image : MetaTensor
        float32 ``(1, x, y, z)`` with its voxel-to-LPS affine.
    label : MetaTensor or None
        Integer ``(1, x, y, z)`` on the image's grid.
    targets : dict of str to float
        Per-series targets, e.g. ``{"lesion": 1.0}``.
    patient : str
        The patient the scan belongs to (a key of its DICOM PatientID, equal for a
        patient's scans), or ``""`` when unknown.
    """

    key: str
    image: MetaTensor
    label: MetaTensor | None
    targets: dict[str, float] = field(default_factory=dict)
    patient: str = ""


def load_subjects(source: DataSourceConfig) -> list[Subject]:
    """The site's subjects from its declared data source, sorted by key."""
    if source.kind == "synthetic":
        return synthetic_subjects(source)
    if source.kind == "dicom-folder":
        return dicom_subjects(source)
    if source.kind in ("nifti-folder", "msd", "bids"):
        return nifti_subjects(source)
    if source.kind == "dicomweb":
        return pacs_subjects(source)
    raise MedfedError(  # unreachable while the config's Literal holds; fail closed anyway
        f"unknown data source kind {source.kind!r}",
        where="[data] kind in site.toml",
        expected="'synthetic', 'dicom-folder', 'nifti-folder', 'msd', 'bids' or 'dicomweb'",
    )


def pacs_subjects(source: DataSourceConfig) -> list[Subject]:
    """The series fetched from the site's PACS (`medfed site scan` fetches what is new).

    A site that never fetched fetches now; after that, training reads what the last
    scan fetched, so the data of a run do not change under it.
    """
    from medfed.data.dicomweb import PacsMirror

    mirror = PacsMirror(source)
    mirror.ensure_synced()
    if not any(mirror.folder.glob("s-*")):
        raise MedfedError(
            "nothing was fetched from the PACS: the query matched no series",
            where=f"{source.pacs.url if source.pacs else ''} ([data.pacs.query] in site.toml)",
            fix="run `medfed site scan` to see what the query matches; widen the query",
        )
    return dicom_subjects(mirror.folder_source())


def nifti_subjects(source: DataSourceConfig) -> list[Subject]:
    """Every usable scan of a NIfTI dataset (folder, MSD, BIDS) with its label and targets.

    Scans left out (see `medfed site scan`) are logged by count; none usable is an error.
    """
    from medfed.data.nifti_source import NiftiSource

    dataset = NiftiSource(source)
    entries, left_out = dataset.usable()
    if left_out:
        log.warning(
            "%d scan(s) of the %s dataset left out; `medfed site scan` says why",
            len(left_out),
            source.kind,
        )
    targets = dataset.layout().targets
    subjects = []
    for entry in entries:
        image, label = dataset.load(entry)
        subjects.append(
            Subject(
                key=entry.key,
                image=image,
                label=label,
                targets=targets.get(entry.key, {}),
                patient=entry.patient,
            )
        )
    if not subjects:
        raise MedfedError(
            f"the {source.kind} dataset holds no usable scan",
            where=source.path,
            fix="run `medfed site scan` to see which files were left out and why",
        )
    return subjects


def dicom_subjects(source: DataSourceConfig) -> list[Subject]:
    """Read every usable series under ``source.path`` with its manifest label and targets."""
    from medfed.data import DicomFolderSource
    from medfed.data.source import UnusableSeries
    from medfed.data.targets import load_targets

    if not source.path:
        raise MedfedError(
            "data kind 'dicom-folder' needs a folder",
            where="[data] path in site.toml",
            expected="the site's DICOM folder",
            fix="set path = '/data/site-folder' (or kind = 'synthetic' for a demo)",
        )
    root = Path(source.path).expanduser()
    manifest = Path(source.manifest) if source.manifest else root / MANIFEST_NAME
    manifest_or_none = manifest if manifest.is_file() else None
    cache = Path(source.cache_dir) if source.cache_dir else None
    folder = DicomFolderSource(root, manifest=manifest_or_none, cache_dir=cache)
    targets = load_targets(manifest) if manifest_or_none is not None else {}
    subjects = []
    unusable = 0
    for series in folder.series():
        try:
            image, label = folder.load(series.series_uid)
        except UnusableSeries as exc:  # one bad file never takes the site down
            unusable += 1
            log.warning("series left out: %s", exc.what)
            continue
        subjects.append(
            Subject(
                key=series.series_uid,
                image=image,
                label=label,
                targets=targets.get(series.series_uid, {}),
                patient=series.patient_id,
            )
        )
    if unusable:
        log.warning(
            "%d series of the DICOM folder left out (their pixels do not decode); "
            "`medfed site scan` names the files",
            unusable,
        )
    if not subjects:
        raise MedfedError(
            "the DICOM folder holds no usable series",
            where=str(root),
            fix="run `medfed site scan` to see which files were skipped and why",
        )
    return subjects


def synthetic_subjects(source: DataSourceConfig) -> list[Subject]:
    """Synthesize the subjects of benchmark site ``source.profile`` in memory."""
    from medfed.synth import profile_for_site, synthesize_subject
    from medfed.synth.sites import lesion_flags

    n = max(2, source.num_samples // SAMPLES_PER_SYNTHETIC_SUBJECT)
    site = source.profile
    profile = profile_for_site(site, seed=source.seed)
    flags = lesion_flags(n, seed=source.seed, site_index=site, fraction=0.5)
    return [
        _as_subject(
            synthesize_subject(
                profile, seed=source.seed, site_index=site, subject_index=i, lesion=bool(flags[i])
            ),
            key=f"synthetic-{i:03d}",
            targets={"lesion": float(flags[i])},
        )
        for i in range(n)
    ]


def public_atlas_subjects(count: int, *, seed: int) -> list[Subject]:
    """Labelled public subjects for pretraining: Colin27 under random warps and scanners.

    Another brain than the sites' MNI152 anatomy, its labels from a Gaussian mixture on
    its own T1; no site's data (:mod:`medfed.synth.public`); one scan per subject.
    """
    from medfed.synth.public import public_subjects

    return [
        _as_subject(vol, key=f"public-{i:04d}", targets={})
        for i, vol in enumerate(public_subjects(count, seed=seed))
    ]


def _as_subject(vol: SubjectVolume, *, key: str, targets: dict[str, float]) -> Subject:
    affine = torch.as_tensor(_LPS_FROM_RAS @ vol.geometry.affine_ras())
    meta = {"space": SpaceKeys.LPS}
    return Subject(
        key=key,
        image=MetaTensor(torch.from_numpy(vol.image[None]), affine=affine, meta=dict(meta)),
        label=MetaTensor(
            torch.from_numpy(vol.label[None].astype(np.int16)),
            affine=affine.clone(),
            meta=dict(meta),
        ),
        targets=targets,
        patient=key,  # one scan per synthesized patient
    )


def split_subjects(
    keys: Sequence[str],
    *,
    seed: int,
    val_fraction: float,
    strata: Sequence[int] | None = None,
    patients: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split subjects into (train, val) keys, deterministically from ``seed``.

    ``round(n * val_fraction)`` subjects (at least one, and at least one left
    for training) go to validation. With ``strata`` (e.g. the class of each
    subject), each stratum is spread over both sides in proportion. The split
    depends on the set of keys, not their order.
    With ``patients`` (each subject's patient, ``""`` when unknown), a patient's
    scans all land on the same side: the patients are split (``val_fraction`` of
    them), each as its first scan (key order) with that scan's stratum, so with one
    scan per patient the split is the one without ``patients``. A scan of unknown
    patient counts as a patient of its own.

    Raises
    ------
    MedfedError
        Fewer than two subjects, or keys that repeat.
    """
    if len(set(keys)) != len(keys):
        raise MedfedError(
            "subject keys repeat", where="split_subjects", expected="one entry per series"
        )
    if patients is not None:  # split the patients, each represented by its first scan
        owner = {k: p or f"scan:{k}" for k, p in zip(keys, patients, strict=True)}
        first: dict[str, str] = {}
        for k in sorted(keys):
            first.setdefault(owner[k], k)
        stratum = dict(zip(keys, strata, strict=True)) if strata is not None else {}
        firsts = sorted(first.values())
        _, val_firsts = split_subjects(
            firsts,
            seed=seed,
            val_fraction=val_fraction,
            strata=[stratum[k] for k in firsts] if stratum else None,
        )
        on_val = {owner[k] for k in val_firsts}
        return (
            sorted(k for k in keys if owner[k] not in on_val),
            sorted(k for k in keys if owner[k] in on_val),
        )
    n = len(keys)
    if n < 2:
        raise MedfedError(
            f"a train/validation split needs at least 2 subjects, the site has {n}",
            where="[data] in site.toml",
            fix="add series to the site's folder (or raise num_samples for kind = 'synthetic')",
        )
    groups = strata if strata is not None else [0] * n
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    ordered = sorted(zip(keys, groups, strict=True))
    # Each subject's place within its stratum, as a fraction; sorting on it interleaves
    # the strata so that any prefix holds each stratum in proportion.
    place: dict[str, float] = {}
    for g in sorted(set(groups)):
        members = [k for k, s in ordered if s == g]
        for rank, i in enumerate(rng.permutation(len(members))):
            place[members[i]] = (rank + 0.5) / len(members)
    tie = rng.random(n)
    order = sorted(range(n), key=lambda i: (place[ordered[i][0]], tie[i]))
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    val = sorted(ordered[i][0] for i in order[:n_val])
    train = sorted(ordered[i][0] for i in order[n_val:])
    return train, val


def unit_indices(subjects: Sequence[Subject], examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """For ``SiteData.train_units``: the scan and the patient of each training example.

    ``examples[i]`` is how many consecutive examples subject ``i`` gave. ``"patient"``
    is left out when a scan's patient is unknown: DP-SGD per patient is then refused
    rather than guessed.
    """
    counts = torch.tensor(list(examples))
    units = {"scan": torch.repeat_interleave(torch.arange(len(subjects)), counts)}
    if all(s.patient for s in subjects):
        place = {p: i for i, p in enumerate(sorted({s.patient for s in subjects}))}
        index = torch.tensor([place[s.patient] for s in subjects])
        units["patient"] = torch.repeat_interleave(index, counts)
    return units


def preprocess(
    subject: Subject,
    *,
    pixdim: Sequence[float],
    spatial_size: Sequence[int],
    bias_correction: str = "off",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample, normalise and pad/crop one subject to a fixed grid (MONAI transforms).

    With ``bias_correction="n4"`` the scan is first divided by its N4 bias field
    (:mod:`medfed.tasks.bias_field`). Axial slices (orientation LPS: x toward the
    patient's left, y posterior, z superior), voxel size ``pixdim`` in mm (a value
    <= 0 keeps the series' own spacing along that axis), intensities scaled per
    volume so that its 1st..99th percentiles map to 0..1 (clipped), so scanners
    with other raw scales, gains and contrast curves land on one range; then
    centred padding/cropping to ``spatial_size`` (-1 keeps that axis' size).

    Returns
    -------
    image : torch.Tensor
        float32 ``(1, X, Y, Z)``.
    label : torch.Tensor or None
        int64 ``(1, X, Y, Z)``.
    """
    keys = ["image", "label"] if subject.label is not None else ["image"]
    transform = Compose(
        [
            Orientationd(keys=keys, axcodes="LPS", labels=None),
            Spacingd(
                keys=keys,
                pixdim=tuple(pixdim),
                mode=("bilinear", "nearest")[: len(keys)],
                padding_mode="zeros",
            ),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True
            ),
            ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(spatial_size)),
        ]
    )
    data = {"image": subject.image.float()}
    if bias_correction == "n4":
        data["image"] = n4_correct(data["image"])
    if subject.label is not None:
        data["label"] = subject.label.float()  # nearest-neighbour keeps the label values
    out = transform(data)
    image = torch.as_tensor(out["image"].as_tensor(), dtype=torch.float32).contiguous()
    if subject.label is None:
        return image, None
    label = torch.round(out["label"].as_tensor()).to(torch.int64).contiguous()
    return image, label


def axial_slices(
    image: torch.Tensor, label: torch.Tensor, *, min_foreground: float = 0.01, keep_every: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a ``(1, X, Y, Z)`` volume into ``(N, 1, X, Y)`` axial slices.

    Slices with at least ``min_foreground`` of their pixels labelled (brain)
    are all kept; of the others (above the vertex, below the brain) only every
    ``keep_every``-th, so the model still sees empty slices without spending
    most of an epoch on them.
    """
    foreground = (label[0] > 0).float().mean(dim=(0, 1))  # per slice z
    z = torch.arange(label.shape[-1])
    keep = (foreground >= min_foreground) | (z % keep_every == 0)
    images = image[0].permute(2, 0, 1)[keep].unsqueeze(1)
    labels = label[0].permute(2, 0, 1)[keep].unsqueeze(1)
    return images.contiguous(), labels.contiguous()
