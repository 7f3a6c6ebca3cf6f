"""Write a multi-site synthetic benchmark to disk and read a subject back."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from medfed.core.errors import MedfedError
from medfed.synth.dicom_io import read_series, series_ids, write_series
from medfed.synth.generate import FOV_MM, quantise, synthesize_subject
from medfed.synth.layouts import (
    FORMATS,
    LayoutSubject,
    decoded_image,
    nifti_image,
    write_indexes,
    write_subject,
)
from medfed.synth.profiles import LABEL_NAMES, ScannerProfile, profile_for_site
from medfed.synth.template import TEMPLATE_CITATION, TEMPLATE_NOTICE, TEMPLATE_RESOLUTION_MM

SITE_MANIFEST_FORMAT = "medfed-synth-site/2"
SYNTH_FORMAT = "medfed-synth/1"
MAX_SITES = 64
MAX_SUBJECTS_PER_SITE = 500
_LESION_ASSIGN_STREAM = 0xA551

#: Called after each subject: (subjects done, subjects total, "site-2/SYN-site2-004").
ProgressFn = Callable[[int, int, str], None]


def site_name(site_number: int) -> str:
    """Return the folder name of a site, 1-based: ``site-1``."""
    return f"site-{site_number}"


def subject_name(site_number: int, subject_number: int) -> str:
    """Return the PatientID / folder name of a subject, 1-based: ``SYN-site1-007``."""
    return f"SYN-site{site_number}-{subject_number:03d}"


@dataclass(frozen=True)
class SubjectEntry:
    """One subject in a site manifest (all paths relative to the site folder)."""

    subject: str
    series_uid: str
    dicom: str
    label: str
    lesion: bool
    profile: str
    lesion_centre_mni_mm: tuple[float, float, float] | None = None
    lesion_sigma_mm: float | None = None

    def as_dict(self) -> dict[str, object]:
        """Return the JSON value stored under the SeriesInstanceUID key."""
        return {
            "subject": self.subject,
            "dicom": self.dicom,
            "label": self.label,
            "lesion": self.lesion,
            "profile": self.profile,
            "lesion_centre_mni_mm": (
                list(self.lesion_centre_mni_mm) if self.lesion_centre_mni_mm else None
            ),
            "lesion_sigma_mm": self.lesion_sigma_mm,
        }

    @classmethod
    def from_dict(cls, series_uid: str, data: dict[str, object]) -> SubjectEntry:
        """Inverse of :meth:`as_dict`."""
        centre = data.get("lesion_centre_mni_mm")
        sigma = data.get("lesion_sigma_mm")
        c = [float(v) for v in centre] if isinstance(centre, list) and len(centre) == 3 else None
        return cls(
            subject=str(data["subject"]),
            series_uid=series_uid,
            dicom=str(data["dicom"]),
            label=str(data["label"]),
            lesion=bool(data["lesion"]),
            profile=str(data["profile"]),
            lesion_centre_mni_mm=(c[0], c[1], c[2]) if c else None,
            lesion_sigma_mm=float(sigma) if isinstance(sigma, int | float) else None,
        )


@dataclass(frozen=True)
class SiteManifest:
    """Contents of ``<site>/manifest.json``: subjects keyed by SeriesInstanceUID."""

    site: str
    profile: ScannerProfile
    series: dict[str, SubjectEntry]

    def as_dict(self) -> dict[str, object]:
        """Return the JSON document written to ``manifest.json``."""
        return {
            "format": SITE_MANIFEST_FORMAT,
            # The keys of medfed.data's label manifest (medfed.data.labels, .targets), so a
            # site folder is readable as is: DicomFolderSource(site, manifest=site/manifest.json).
            "version": 1,
            "labels": {uid: e.label for uid, e in self.series.items()},
            "targets": {uid: {"lesion": int(e.lesion)} for uid, e in self.series.items()},
            "site": self.site,
            "profile": self.profile.as_dict(),
            "label_names": {str(i): n for i, n in enumerate(LABEL_NAMES)},
            "axes": "array (i, j, k) = DICOM (column, row, slice); label affine is RAS mm",
            "series": {uid: e.as_dict() for uid, e in self.series.items()},
        }

    def subject(self, name: str) -> SubjectEntry:
        """Return the entry of subject ``name`` or raise a MedfedError naming the known ones."""
        for entry in self.series.values():
            if entry.subject == name:
                return entry
        known = ", ".join(e.subject for e in self.series.values())
        raise MedfedError(f"unknown subject {name!r}", where=self.site, expected=f"one of: {known}")


def read_site_manifest(site_dir: Path) -> SiteManifest:
    """Read ``<site_dir>/manifest.json``."""
    path = Path(site_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise MedfedError(
            "site manifest not found",
            where=str(path),
            expected="a folder written by `medfed data synth`",
            fix="point at DIR/site-N of a `medfed data synth --out DIR` run",
        ) from err
    except json.JSONDecodeError as err:
        raise MedfedError(f"site manifest is not valid JSON: {err}", where=str(path)) from err
    if data.get("format") != SITE_MANIFEST_FORMAT:
        raise MedfedError(
            f"unsupported site manifest format {data.get('format')!r}",
            where=str(path),
            expected=SITE_MANIFEST_FORMAT,
            fix="regenerate with this medfed version: `medfed data synth`",
        )
    prof = data["profile"]
    prof["tissue_means"] = tuple(prof["tissue_means"])
    return SiteManifest(
        site=str(data["site"]),
        profile=ScannerProfile(**prof),
        series={uid: SubjectEntry.from_dict(uid, e) for uid, e in data["series"].items()},
    )


class SubjectArrays(NamedTuple):
    """A subject read back from disk, axes (i, j, k) = DICOM (column, row, slice)."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]


def load_subject_arrays(site_dir: Path, subject: str) -> SubjectArrays:
    """Read one subject's DICOM series and label volume back, in generated-array orientation.

    The image is rescaled (``stored * RescaleSlope + RescaleIntercept``, float32), the
    slices sorted along the slice normal; the label is the NIfTI array as stored (uint8).
    Raises MedfedError when the two do not share shape and RAS affine.
    """
    site_dir = Path(site_dir)
    entry = read_site_manifest(site_dir).subject(subject)
    image, geometry, uid = read_series(site_dir / entry.dicom)
    label_path = site_dir / entry.label
    if not label_path.is_file():
        raise MedfedError(
            "label volume missing",
            where=str(label_path),
            fix="regenerate the site with `medfed data synth`",
        )
    nii = nib.Nifti1Image.from_filename(label_path)
    label = np.asarray(nii.dataobj, dtype=np.uint8)
    if (
        uid != entry.series_uid
        or label.shape != image.shape
        or not np.allclose(nii.affine, geometry.affine_ras(), atol=1e-3)
    ):
        raise MedfedError(
            "DICOM series and label volume disagree (UID, shape or affine)",
            where=f"{site_dir / entry.dicom} vs {label_path}",
            expected=f"UID {entry.series_uid}, shape {image.shape}, same RAS affine",
            fix="regenerate the site with `medfed data synth`",
        )
    return SubjectArrays(image=image, label=label, spacing=geometry.spacing)


@dataclass(frozen=True)
class SiteSummary:
    """What one site holds, for the command line's summary table."""

    site: str
    profile: str
    contrast: str
    subjects: int
    lesion_subjects: int
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    slice_thickness: float
    files: int
    bytes: int


SUMMARY_HEADER: tuple[str, ...] = (
    "site",
    "profile",
    "contrast",
    "subjects",
    "lesion",
    "shape (i,j,k)",
    "spacing mm",
    "files",
    "MB",
)


@dataclass(frozen=True)
class SynthManifest:
    """Result of :func:`synthesize_sites` (also written, less timing, as ``synth.json``)."""

    out: Path
    seed: int
    subjects_per_site: int
    sites: tuple[SiteSummary, ...]
    elapsed_s: float = field(default=0.0, compare=False)

    def summary_rows(self) -> list[tuple[str, ...]]:
        """Return rows matching :data:`SUMMARY_HEADER`, as strings."""
        return [
            (
                s.site,
                s.profile,
                s.contrast,
                str(s.subjects),
                str(s.lesion_subjects),
                "x".join(str(n) for n in s.shape),
                "x".join(f"{v:g}" for v in s.spacing) + f" (thk {s.slice_thickness:g})",
                str(s.files),
                f"{s.bytes / 1e6:.1f}",
            )
            for s in self.sites
        ]

    def as_dict(self) -> dict[str, object]:
        """Return the ``synth.json`` document: what is real, what is synthetic, what was written."""
        return {
            "format": SYNTH_FORMAT,
            "generator": "medfed.synth",
            "seed": self.seed,
            "subjects_per_site": self.subjects_per_site,
            "task": {
                "segmentation": {str(i): n for i, n in enumerate(LABEL_NAMES)},
                "classification": "lesion (per-subject flag in each site manifest)",
            },
            "real": [
                "anatomy: MNI ICBM152 2009 nonlinear symmetric T1 template, grey- and "
                "white-matter probability maps and brain mask, as bundled in nilearn, "
                f"read at {TEMPLATE_RESOLUTION_MM} mm",
            ],
            "synthetic": [
                "every subject: a random smooth deformation (affine + displacement field) "
                "of the one template; all subjects share the template's anatomy",
                "CSF: brain mask minus GM minus WM (no CSF map is bundled); labels are the "
                "argmax of the tissue maps, resampled nearest-neighbour",
                "lesions: Gaussian hypo-/hyper-intense blobs in white matter, not real pathology",
                "scanner profiles: tissue contrast, gamma curve, smooth bias field, Rician noise, "
                "resolution and slice thickness are simulated per site",
                "DICOM headers: fabricated; PatientID SYN-siteN-NNN, no real person, "
                "UIDs derived from the seed under pydicom's UID root",
            ],
            "template_citation": TEMPLATE_CITATION,
            "template_notice": TEMPLATE_NOTICE,
            "axes": "array (i, j, k) = DICOM (column, row, slice); NIfTI label affine is RAS mm",
            "fov_mm": list(FOV_MM),
            "sites": [
                {
                    "site": s.site,
                    "profile": s.profile,
                    "contrast": s.contrast,
                    "subjects": s.subjects,
                    "lesion_subjects": s.lesion_subjects,
                    "shape": list(s.shape),
                    "spacing_mm": list(s.spacing),
                    "slice_thickness_mm": s.slice_thickness,
                    "manifest": f"{s.site}/manifest.json",
                }
                for s in self.sites
            ],
        }


def _check_args(
    sites: int,
    subjects_per_site: int,
    seed: int,
    lesion_fraction: float,
    formats: tuple[str, ...] = ("dicom",),
) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise MedfedError(
            f"unknown format {unknown[0]!r}",
            where="--format",
            expected=f"one or more of {', '.join(FORMATS)}",
        )
    if not 1 <= sites <= MAX_SITES:
        raise MedfedError(
            f"--sites {sites} is out of range", where="--sites", expected=f"1 to {MAX_SITES}"
        )
    if not 1 <= subjects_per_site <= MAX_SUBJECTS_PER_SITE:
        raise MedfedError(
            f"{subjects_per_site} subjects per site is out of range",
            where="--subjects",
            expected=f"1 to {MAX_SUBJECTS_PER_SITE}",
        )
    if seed < 0:
        raise MedfedError(f"--seed {seed} is negative", where="--seed", expected="an integer >= 0")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise MedfedError(
            f"lesion fraction {lesion_fraction} is out of range",
            where="lesion_fraction",
            expected="0.0 to 1.0",
        )


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MedfedError(
            "output path is a file",
            where=str(out),
            expected="a new or empty folder",
            fix="choose another --out",
        )
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MedfedError(
                "output folder is not empty",
                where=str(out),
                expected="a new or empty folder",
                fix="choose another --out, or pass --overwrite to replace an earlier "
                "`medfed data synth` output",
            )
        if not (out / "synth.json").is_file():
            raise MedfedError(
                "refusing to overwrite a folder that `medfed data synth` did not write",
                where=str(out),
                expected="a folder holding synth.json",
                fix="choose a new or empty --out",
            )
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith("site-"):
                shutil.rmtree(child)
        (out / "synth.json").unlink()
    out.mkdir(parents=True, exist_ok=True)


def lesion_flags(n: int, *, seed: int, site_index: int, fraction: float) -> np.ndarray:
    """Return which of a site's ``n`` subjects carry a lesion (exactly ``round(fraction*n)``)."""
    rng = np.random.default_rng([seed, site_index, _LESION_ASSIGN_STREAM])
    flags = np.zeros(n, dtype=bool)
    flags[rng.permutation(n)[: round(fraction * n)]] = True
    return flags


def synthesize_sites(
    out: Path,
    *,
    sites: int = 4,
    subjects_per_site: int = 10,
    seed: int = 0,
    lesion_fraction: float = 0.5,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    formats: tuple[str, ...] = ("dicom",),
) -> SynthManifest:
    """Write a synthetic multi-site brain MRI benchmark under ``out``.

    Layout: ``out/synth.json``; per site ``out/site-N/manifest.json``,
    ``out/site-N/dicom/<subject>/IM-NNNN.dcm`` and ``out/site-N/labels/<subject>.nii.gz``.
    The same ``seed`` gives byte-identical files; site N and subject M are the same
    whatever ``sites`` and ``subjects_per_site`` are (lesion assignment aside).
    ``synth.json`` is written last, so its presence marks a complete output.

    ``formats`` beyond ``"dicom"`` (always written: the manifest describes it) add the
    same subjects as NIfTI datasets in ``out/site-N/nifti``, ``msd`` and ``bids``
    (:mod:`medfed.synth.layouts`).
    """
    out = Path(out)
    formats = tuple(dict.fromkeys(("dicom", *formats)))
    _check_args(sites, subjects_per_site, seed, lesion_fraction, formats)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    total = sites * subjects_per_site
    done = 0
    summaries = []
    for site_index in range(sites):
        name = site_name(site_index + 1)
        site_dir = out / name
        profile = profile_for_site(site_index, seed=seed)
        flags = lesion_flags(
            subjects_per_site, seed=seed, site_index=site_index, fraction=lesion_fraction
        )
        entries: dict[str, SubjectEntry] = {}
        n_files = n_bytes = 0
        shape: tuple[int, int, int] = (0, 0, 0)
        geometry = None
        for subject_index in range(subjects_per_site):
            subject = subject_name(site_index + 1, subject_index + 1)
            vol = synthesize_subject(
                profile,
                seed=seed,
                site_index=site_index,
                subject_index=subject_index,
                lesion=bool(flags[subject_index]),
            )
            geometry = vol.geometry
            stored, slope, intercept = quantise(vol.image)
            ids = series_ids(seed=seed, site=name, subject=subject, subject_index=subject_index)
            files = write_series(
                site_dir / "dicom" / subject,
                stored=stored,
                slope=slope,
                intercept=intercept,
                geometry=vol.geometry,
                ids=ids,
                profile=profile,
                seed=seed,
                institution=name,
            )
            label_rel = f"labels/{subject}.nii.gz"
            (site_dir / "labels").mkdir(parents=True, exist_ok=True)
            nib.save(nifti_image(vol.label, vol.geometry.affine_ras()), site_dir / label_rel)
            n_files += len(files) + 1
            n_bytes += sum(f.stat().st_size for f in files) + (site_dir / label_rel).stat().st_size
            if len(formats) > 1:
                n_bytes += write_subject(
                    site_dir,
                    formats,
                    LayoutSubject(
                        name=subject,
                        image=decoded_image(stored, slope, intercept),
                        label=vol.label,
                        affine_ras=vol.geometry.affine_ras(),
                        lesion=vol.lesion is not None,
                    ),
                    contrast=profile.contrast,
                )
                n_files += 2 * (len(formats) - 1)
            les = vol.lesion
            entries[ids.series_uid] = SubjectEntry(
                subject=subject,
                series_uid=ids.series_uid,
                dicom=f"dicom/{subject}",
                label=label_rel,
                lesion=les is not None,
                profile=profile.name,
                lesion_centre_mni_mm=les.centre_mni_mm if les else None,
                lesion_sigma_mm=les.sigma_mm if les else None,
            )
            shape = vol.geometry.shape
            done += 1
            if progress is not None:
                progress(done, total, f"{name}/{subject}")
        if len(formats) > 1:
            n_bytes += write_indexes(
                site_dir,
                formats,
                {e.subject: e.lesion for e in entries.values()},
                site=name,
                contrast=profile.contrast,
            )
        manifest = SiteManifest(site=name, profile=profile, series=entries)
        (site_dir / "manifest.json").write_text(json.dumps(manifest.as_dict(), indent=2) + "\n")
        assert geometry is not None
        summaries.append(
            SiteSummary(
                site=name,
                profile=profile.name,
                contrast=profile.contrast,
                subjects=subjects_per_site,
                lesion_subjects=int(flags.sum()),
                shape=shape,
                spacing=geometry.spacing,
                slice_thickness=geometry.slice_thickness,
                files=n_files + 1,
                bytes=n_bytes,
            )
        )
    result = SynthManifest(
        out=out,
        seed=seed,
        subjects_per_site=subjects_per_site,
        sites=tuple(summaries),
        elapsed_s=time.perf_counter() - start,
    )
    (out / "synth.json").write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return result
