"""Per-series targets (e.g. a lesion flag) for classification, from the label manifest.

Manifest format
---------------
The JSON label manifest of :mod:`medfed.data.labels` may carry an optional
``"targets"`` mapping, SeriesInstanceUID -> ``{name: number}``::

    {"version": 1,
     "labels": {"1.2.826.0.1.3680043.8.498.1": "labels/SYN-site1-001.nii.gz"},
     "targets": {"1.2.826.0.1.3680043.8.498.1": {"lesion": 1}}}

A series may have targets without a label volume and the reverse. CSV manifests
carry no targets.
"""

from __future__ import annotations

import json
from pathlib import Path

from medfed.core.errors import MedfedError
from medfed.data.labels import read_manifest_text

_EXPECTED = '"targets": {"<SeriesInstanceUID>": {"<name>": <number>, ...}, ...}'


def load_targets(path: Path) -> dict[str, dict[str, float]]:
    """Read the manifest's ``targets``: SeriesInstanceUID -> {target name: value}.

    A manifest without ``targets`` (or a CSV manifest) gives an empty mapping.

    Raises
    ------
    MedfedError
        The manifest is unreadable, not JSON, or its ``targets`` is malformed.
    """
    text = read_manifest_text(path)
    if path.suffix.lower() == ".csv":
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MedfedError(
            "the label manifest is not valid JSON", where=str(path), expected=_EXPECTED
        ) from exc
    raw = data.get("targets", {}) if isinstance(data, dict) else None
    if not _well_formed(raw):
        raise MedfedError(
            "the manifest's targets are malformed",
            where=str(path),
            expected=_EXPECTED,
            fix="rewrite the targets in that form (numbers; 0 or 1 for a flag)",
        )
    return {uid: {k: float(v) for k, v in values.items()} for uid, values in raw.items()}


def _well_formed(raw: object) -> bool:
    if not isinstance(raw, dict):
        return False
    for uid, values in raw.items():
        if not isinstance(uid, str) or not isinstance(values, dict):
            return False
        for name, value in values.items():
            if not isinstance(name, str) or not isinstance(value, int | float):
                return False  # bool is an int: true/false read as 1/0
    return True
