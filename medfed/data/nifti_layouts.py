"""Which images and labels a NIfTI dataset holds: a plain folder, an MSD task, a BIDS dataset.

Each layout is read into the same list of :class:`NiftiEntry` (one scan, its label
file, its patient) plus the files it had to leave out and why, so the source, the
scan report and the cache treat the three alike. Only file names and the layout's
own index files are read here; the images' headers are checked by
:mod:`medfed.data.nifti_source`.

``nifti-folder``
    ``images`` and ``labels`` are path templates relative to the folder with one
    ``{subject}`` placeholder, default ``images/{subject}.nii.gz`` and
    ``labels/{subject}.nii.gz`` (nnU-Net's ``imagesTr/{subject}_0000.nii.gz`` works too).
    The subject is the patient.
``msd``
    A Medical Segmentation Decathlon task folder: ``dataset.json`` lists the
    ``training`` pairs; a multi-modal 4-D image gives the volume named by
    ``modality`` (one of ``dataset.json``'s ``modality`` names). The challenge's
    unlabelled ``test`` images are not used. Each case is its own patient.
``bids``
    ``sub-<label>[/ses-<label>]/anat/sub-<label>[_ses-<label>][_...]_<modality>.nii[.gz]``
    (modality: a suffix such as ``T1w``, ``T2w``, ``FLAIR``); labels are the
    ``_dseg`` files with the same entities under ``derivatives/<pipeline>/``
    (``label_pipeline`` picks one when several pipelines have them). The BIDS
    subject is the patient, so a patient's sessions stay on one side of a split.

Per-scan targets (e.g. ``lesion``) come from a JSON file ``{"<subject>": {"lesion": 1}}``
(nifti-folder, msd: ``targets.json`` beside the data by default) or a TSV/CSV whose
first column names the subject (bids: ``participants.tsv`` by default).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from medfed.core.errors import MedfedError

NIFTI_KINDS = ("nifti-folder", "msd", "bids")
DEFAULT_IMAGES = "images/{subject}.nii.gz"
DEFAULT_LABELS = "labels/{subject}.nii.gz"
_PLACEHOLDER = "{subject}"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_BIDS_ENTITY = re.compile(r"^[a-zA-Z]+-[a-zA-Z0-9]+$")
_BIDS_LABEL_SUFFIX = "dseg"


@dataclass(frozen=True)
class NiftiEntry:
    """One scan: its key, image and label files (relative to the dataset root), patient."""

    key: str
    image: str
    label: str | None
    patient: str
    channel: int | None = None  # the volume of a 4-D (multi-modal) image to use


@dataclass(frozen=True)
class LeftOut:
    """A file of the dataset that gives no scan, and why."""

    path: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class NiftiLayout:
    """What a layout lists: scans, files left out, per-subject targets."""

    entries: tuple[NiftiEntry, ...]
    left_out: tuple[LeftOut, ...] = ()
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    modality: str = ""


def nifti_stem(name: str) -> str | None:
    """``case_01`` for ``case_01.nii.gz`` or ``case_01.nii``; ``None`` for another file."""
    for suffix in _NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


# ----------------------------------------------------------------------------- nifti-folder


def read_nifti_folder(
    root: Path, *, images: str = "", labels: str = "", targets: Path | None = None
) -> NiftiLayout:
    """Scans matched by the ``images``/``labels`` templates under ``root``."""
    images = images or DEFAULT_IMAGES
    labels = labels or DEFAULT_LABELS
    for key, template in (("data.images", images), ("data.labels", labels)):
        if template.count(_PLACEHOLDER) != 1 or Path(template).is_absolute():
            raise MedfedError(
                f"{key} = {template!r} is not a path template with one {_PLACEHOLDER}",
                where=f"[data] {key} in site.toml",
                expected=f"a path relative to data.path, e.g. {DEFAULT_IMAGES!r}",
                fix=f"write the file name with {_PLACEHOLDER} where the subject's name stands",
            )
    head, tail = images.split(_PLACEHOLDER)
    pattern = re.compile(re.escape(head) + r"(?P<subject>[^/]+?)" + re.escape(tail) + "$")
    entries = []
    for path in sorted(root.glob(images.replace(_PLACEHOLDER, "*"))):
        rel = path.relative_to(root).as_posix()
        match = pattern.match(rel)
        if match is None or not path.is_file():
            continue
        subject = match["subject"]
        label = labels.replace(_PLACEHOLDER, subject)
        entries.append(
            NiftiEntry(
                key=subject,
                image=rel,
                label=label if (root / label).is_file() else None,
                patient=subject,
            )
        )
    return NiftiLayout(entries=tuple(entries), targets=_targets(root, targets, "targets.json"))


# ----------------------------------------------------------------------------- msd


def read_msd(root: Path, *, modality: str = "", targets: Path | None = None) -> NiftiLayout:
    """The ``training`` cases of an MSD task folder (``dataset.json``)."""
    index = root / "dataset.json"
    expected = (
        '{"modality": {"0": "T1w"}, "training": [{"image": "./imagesTr/x.nii.gz", '
        '"label": "./labelsTr/x.nii.gz"}]}'
    )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedfedError(
            "the MSD task folder has no dataset.json",
            where=str(index),
            expected="a Medical Segmentation Decathlon task folder",
            fix="point data.path at the folder holding dataset.json, imagesTr "
            "and labelsTr (or use kind = 'nifti-folder')",
        ) from None
    except (OSError, ValueError) as exc:
        raise MedfedError(
            f"cannot read dataset.json: {exc}", where=str(index), expected=expected
        ) from None
    training = data.get("training") if isinstance(data, dict) else None
    modalities = data.get("modality", {}) if isinstance(data, dict) else None
    if (
        not isinstance(training, list)
        or not isinstance(modalities, dict)
        or not all(isinstance(t, dict) and isinstance(t.get("image"), str) for t in training)
    ):
        raise MedfedError(
            "dataset.json lacks a 'training' list of {image, label} pairs or its 'modality' map",
            where=str(index),
            expected=expected,
            fix="restore the task's dataset.json",
        )
    names = [str(modalities[k]) for k in sorted(modalities, key=_int_or_text)]
    channel = _msd_channel(names, modality, index)
    entries = []
    left_out = []
    for case in training:
        rel = _inside(root, case["image"], index)
        label = case.get("label")
        stem = nifti_stem(Path(rel).name)
        if stem is None:
            left_out.append(LeftOut(rel, "not a NIfTI file", "dataset.json names it"))
            continue
        label_rel = _inside(root, label, index) if isinstance(label, str) else None
        entries.append(
            NiftiEntry(key=stem, image=rel, label=label_rel, patient=stem, channel=channel)
        )
    return NiftiLayout(
        entries=tuple(entries),
        left_out=tuple(left_out),
        targets=_targets(root, targets, "targets.json"),
        modality=names[channel] if channel is not None else (names[0] if names else ""),
    )


def _msd_channel(names: list[str], modality: str, index: Path) -> int | None:
    """Which volume of a 4-D image to use; ``None`` for single-modality (3-D) tasks."""
    if modality:
        folded = [n.casefold() for n in names]
        if modality.casefold() not in folded:
            raise MedfedError(
                f"the MSD task has no modality {modality!r}",
                where=f"{index} 'modality'",
                expected=f"one of {names}",
                fix="set data.modality to one of them",
            )
        return folded.index(modality.casefold()) if len(names) > 1 else None
    if len(names) > 1:
        raise MedfedError(
            f"the MSD task is multi-modal ({', '.join(names)}) and the task takes one image",
            where=f"{index} 'modality'",
            expected="data.modality naming one of them",
            fix=f'set data.modality = "{names[0]}" in site.toml',
        )
    return None


def _inside(root: Path, rel: str, index: Path) -> str:
    """``rel`` (``./imagesTr/x.nii.gz``) made relative to ``root``; refuses to leave it."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise MedfedError(
            f"dataset.json names a file outside the task folder: {rel!r}",
            where=str(index),
            expected="paths like ./imagesTr/x.nii.gz",
            fix="keep the images and labels inside the task folder",
        )
    return path.relative_to(root.resolve()).as_posix()


def _int_or_text(key: object) -> tuple[int, str]:
    text = str(key)
    return (int(text), "") if text.isdigit() else (1 << 30, text)


# ----------------------------------------------------------------------------- bids


def read_bids(
    root: Path, *, modality: str = "", label_pipeline: str = "", targets: Path | None = None
) -> NiftiLayout:
    """The anatomical scans of one suffix in a BIDS dataset, labels from its derivatives."""
    if not (root / "dataset_description.json").is_file():
        raise MedfedError(
            "not a BIDS dataset: dataset_description.json is missing",
            where=str(root),
            expected="the root folder of a BIDS dataset",
            fix="point data.path at the folder holding dataset_description.json "
            "and the sub-* folders",
        )
    scans: dict[str, list[tuple[dict[str, str], str]]] = {}
    left_out = []
    for path in sorted(root.glob("sub-*/**/anat/*.nii*")):
        rel = path.relative_to(root).as_posix()
        parsed = _bids_name(path.name)
        if parsed is None:
            left_out.append(
                LeftOut(
                    rel,
                    "not a BIDS file name",
                    "expected sub-<label>[_key-value...]_<suffix>.nii[.gz]",
                )
            )
            continue
        entities, suffix = parsed
        scans.setdefault(suffix, []).append((entities, rel))
    suffix = _bids_suffix(scans, modality, root)
    labels = _bids_labels(root, label_pipeline)
    entries = []
    for entities, rel in scans.get(suffix, []):
        key = "_".join(f"{k}-{v}" for k, v in entities.items())
        found = labels.get(_scan_identity(entities), [])
        if len(found) > 1:
            left_out.append(
                LeftOut(
                    rel,
                    "several label files match",
                    f"{len(found)} _dseg files in derivatives; set "
                    "data.label_pipeline to one pipeline",
                )
            )
            continue
        entries.append(
            NiftiEntry(
                key=key,
                image=rel,
                label=found[0] if found else None,
                patient=f"sub-{entities['sub']}",
            )
        )
    participants = _targets(root, targets, "participants.tsv")
    per_scan = {
        e.key: participants.get(e.patient, participants.get(e.patient[4:], {})) for e in entries
    }
    return NiftiLayout(
        entries=tuple(entries),
        left_out=tuple(left_out),
        targets={k: v for k, v in per_scan.items() if v},
        modality=suffix,
    )


def _bids_name(name: str) -> tuple[dict[str, str], str] | None:
    """Entities (in order) and suffix of ``sub-01_ses-2_T1w.nii.gz``, or ``None``."""
    stem = nifti_stem(name)
    if stem is None:
        return None
    *parts, suffix = stem.split("_")
    if not parts or not suffix.isalnum() or not all(_BIDS_ENTITY.match(p) for p in parts):
        return None
    entities = dict(p.split("-", 1) for p in parts)
    if "sub" not in entities or len(entities) != len(parts):
        return None
    return entities, suffix


def _bids_suffix(scans: dict[str, list], modality: str, root: Path) -> str:
    present = sorted(s for s in scans if s != _BIDS_LABEL_SUFFIX)
    if modality:
        if modality not in scans:
            raise MedfedError(
                f"the BIDS dataset has no {modality!r} scans",
                where=f"{root} (sub-*/anat/*_{modality}.nii.gz)",
                expected=f"one of the suffixes found: {', '.join(present) or 'none'}",
                fix="set data.modality to one of them (suffixes are case-sensitive)",
            )
        return modality
    if len(present) != 1:
        raise MedfedError(
            "the BIDS dataset has "
            + (
                f"several anatomical suffixes ({', '.join(present)})"
                if present
                else "no anatomical scans"
            ),
            where=f"{root} sub-*/anat",
            expected="data.modality naming the one to train on",
            fix=f'set data.modality = "{present[0]}"'
            if present
            else "check data.path points at the BIDS root with sub-*/anat/*.nii.gz files",
        )
    return present[0]


def _bids_labels(root: Path, pipeline: str) -> dict[tuple[str, ...], list[str]]:
    """``_dseg`` label files under ``derivatives``, by the scan entities they label."""
    base = root / "derivatives"
    if pipeline:
        base = base / pipeline
        if not base.is_dir():
            raise MedfedError(
                f"the BIDS dataset has no derivatives pipeline {pipeline!r}",
                where=str(base),
                expected="a folder under derivatives/",
                fix="set data.label_pipeline to an existing pipeline folder",
            )
    found: dict[tuple[str, ...], list[str]] = {}
    for path in sorted(base.glob("**/sub-*/**/anat/*_dseg.nii*")):
        parsed = _bids_name(path.name)
        if parsed is None:
            continue
        found.setdefault(_scan_identity(parsed[0]), []).append(path.relative_to(root).as_posix())
    return found


def _scan_identity(entities: dict[str, str]) -> tuple[str, ...]:
    """The entities that name a scan (a label adds space-/desc-/label- of its own)."""
    return tuple(
        f"{k}-{entities[k]}" for k in ("sub", "ses", "acq", "ce", "rec", "run") if k in entities
    )


# ----------------------------------------------------------------------------- targets


def _targets(root: Path, given: Path | None, default_name: str) -> dict[str, dict[str, float]]:
    path = given if given is not None else root / default_name
    if given is None and not path.is_file():
        return {}
    return read_targets(path)


def read_targets(path: Path) -> dict[str, dict[str, float]]:
    """Per-subject numeric targets from JSON ``{subject: {name: number}}`` or a TSV/CSV table.

    In a table the first column names the subject; every other column whose
    values are numbers (or ``n/a``, left out) is a target.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedfedError(
            f"cannot read the targets file: {exc.strerror}",
            where=str(path),
            fix="check data.targets in site.toml",
        ) from None
    if path.suffix.lower() == ".json":
        return _json_targets(text, path)
    rows = list(csv.reader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows or len(rows[0]) < 1:
        return {}
    header, body = rows[0], rows[1:]
    out: dict[str, dict[str, float]] = {}
    numeric = [
        i
        for i in range(1, len(header))
        if all(_number(r[i]) is not None or r[i].strip() in ("n/a", "") for r in body if len(r) > i)
    ]
    for row in body:
        if not row or not row[0].strip():
            continue
        values = {header[i]: _number(row[i]) for i in numeric if i < len(row)}
        out[row[0].strip()] = {k: v for k, v in values.items() if v is not None}
    return out


def _json_targets(text: str, path: Path) -> dict[str, dict[str, float]]:
    expected = '{"<subject>": {"<name>": <number>, ...}, ...}'
    try:
        data = json.loads(text)
    except ValueError:
        raise MedfedError(
            "the targets file is not valid JSON", where=str(path), expected=expected
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and all(_number(x) is not None for x in v.values())
        for v in data.values()
    ):
        raise MedfedError(
            "the targets file is malformed",
            where=str(path),
            expected=expected,
            fix="rewrite it in that form (numbers; 0 or 1 for a flag)",
        )
    return {str(k): {str(n): float(x) for n, x in v.items()} for k, v in data.items()}


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
