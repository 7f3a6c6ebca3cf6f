"""The sites of a simulation and their data: generated, `medfed data synth` folders, a partition.

Each simulated site is a name and a ``[data]`` section, exactly what a deployed
site's site.toml declares, so a simulated site reads its data with the task's own
loader, as a site daemon does:

- :func:`synthetic_sites`: ``site-1`` .. ``site-N`` with generated data, the same
  data a `medfed demo` / `medfed compare` federation of N sites gets
  (:class:`medfed.local.LocalFederation`: seed ``1000 + i``, scanner profile ``i``);
- :func:`folder_sites`: one site per site folder of a `medfed data synth` output;
- :func:`partitioned_sites`: the subjects of all site folders of such an output,
  pooled and shared out among N sites (:func:`medfed.data.partition.partition`: IID,
  or Dirichlet(alpha) by label or by scanner). Each part becomes a site folder of
  symbolic links to the pooled DICOM files and label volumes, with its own
  manifest: a DICOM folder like any site's. Nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.core.config import DataSourceConfig, validate
from medfed.core.errors import ConfigError
from medfed.core.files import atomic_write
from medfed.data.partition import mix, partition
from medfed.data.sites import site_sources

if TYPE_CHECKING:
    from medfed.synth.sites import SubjectEntry

#: What a partition shares out by: the subject's label (lesion or not) or its scanner.
PARTITION_KEYS = ("label", "scanner")
PARTITION_FILE = "partition.json"
#: Fewest subjects a partitioned site holds: one to train on, one to validate with.
MIN_SUBJECTS = 2


@dataclass(frozen=True)
class SimSite:
    """One simulated site: its name and its data source (absolute paths)."""

    name: str
    data: DataSourceConfig


def synthetic_sites(count: int) -> list[SimSite]:
    """``site-1`` .. ``site-N`` with generated data, as a LocalFederation of N sites has."""
    return [
        SimSite(
            f"site-{i + 1}",
            validate(
                DataSourceConfig,
                {"kind": "synthetic", "seed": 1000 + i, "profile": i},
                where="simulated site data",
            ),
        )
        for i in range(count)
    ]


def folder_sites(data_dir: Path) -> list[SimSite]:
    """One site per site folder of a `medfed data synth` output, under its folder's name."""
    return [SimSite(name, source) for name, source in site_sources(data_dir).items()]


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """How a pooled dataset is shared out: scheme, key, concentration, seed, sites."""

    sites: int
    scheme: str = "iid"
    by: str = "label"
    alpha: float = 0.5
    seed: int = 0

    def folder_name(self, data_dir: Path) -> str:
        """A folder name of this partition of ``data_dir``: runs on it share its folder."""
        digest = hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]
        what = "iid" if self.scheme == "iid" else f"dirichlet-{self.by}-alpha{self.alpha:g}"
        return f"{what}-{self.sites}sites-seed{self.seed}-{digest}"

    def as_dict(self) -> dict[str, Any]:
        """JSON form (``alpha`` and ``by`` only where the scheme reads them)."""
        out: dict[str, Any] = {"sites": self.sites, "scheme": self.scheme, "seed": self.seed}
        if self.scheme == "dirichlet":
            out.update(by=self.by, alpha=self.alpha)
        return out


def partitioned_sites(data_dir: Path, out: Path, spec: PartitionSpec) -> list[SimSite]:
    """The subjects of every site folder under ``data_dir``, shared out among ``spec.sites``.

    Writes ``out/site-N/`` (``dicom/`` and ``labels/`` of symbolic links, and a
    ``manifest.json`` of the subjects' labels and targets) and ``out/partition.json``
    (the spec, each site's subjects and its mix of labels and scanners). A folder
    already holding the same partition is reused (its decoded-series caches with it).
    """
    from medfed.synth import read_site_manifest

    if spec.by not in PARTITION_KEYS:
        raise ConfigError(
            f"Cannot partition by {spec.by!r}.",
            where="--partition-by",
            expected=" or ".join(PARTITION_KEYS),
        )
    data_dir, out = Path(data_dir).resolve(), Path(out).resolve()
    pooled = (
        [
            (site, entry)
            for site in sorted(p for p in data_dir.iterdir() if (p / "manifest.json").is_file())
            for entry in sorted(read_site_manifest(site).series.values(), key=lambda e: e.subject)
        ]
        if data_dir.is_dir()
        else []
    )
    if not pooled:
        raise ConfigError(
            "No subjects to partition.",
            where=str(data_dir),
            expected="a `medfed data synth` output (site-N/manifest.json)",
            fix=f"create one with `medfed data synth --out {data_dir}`",
        )
    keys = [
        ("lesion" if e.lesion else "no lesion") if spec.by == "label" else e.profile
        for _, e in pooled
    ]
    parts = partition(
        keys,
        spec.sites,
        scheme=spec.scheme,
        alpha=spec.alpha,
        seed=spec.seed,
        min_items=MIN_SUBJECTS,
    )
    names = [f"site-{i + 1}" for i in range(spec.sites)]
    record = {
        "data": str(data_dir),
        "spec": spec.as_dict(),
        "sites": {
            name: {
                "subjects": [pooled[i][1].subject for i in part],
                "mix": {str(k): v for k, v in sorted(m.items(), key=str)},
            }
            for name, part, m in zip(names, parts, mix(keys, parts), strict=True)
        },
    }
    marker = out / PARTITION_FILE
    if marker.is_file():
        if json.loads(marker.read_text(encoding="utf-8")) != record:
            raise ConfigError(
                "The folder holds a different partition.",
                where=str(out),
                fix="choose another folder, or delete this one",
            )
    else:
        for name, part in zip(names, parts, strict=True):
            _write_site(out / name, [pooled[i] for i in part])
        atomic_write(marker, json.dumps(record, indent=2).encode())  # last: marks it complete
    return [
        SimSite(
            name,
            validate(
                DataSourceConfig,
                {
                    "kind": "dicom-folder",
                    "path": str(out / name / "dicom"),
                    "manifest": str(out / name / "manifest.json"),
                    "cache_dir": str(out / name / "cache"),
                },
                where=str(marker),
            ),
        )
        for name in names
    ]


def _write_site(folder: Path, subjects: list[tuple[Path, SubjectEntry]]) -> None:
    """A site folder of links to its subjects' DICOM files and labels, with their manifest."""
    labels: dict[str, str] = {}
    targets: dict[str, dict[str, int]] = {}
    for source, entry in subjects:
        series = folder / "dicom" / entry.subject
        series.mkdir(parents=True, exist_ok=True)
        # files, not folders: the DICOM indexer does not follow linked folders
        for file in sorted((source / entry.dicom).iterdir()):
            _link(series / file.name, file)
        label = Path("labels") / Path(entry.label).name
        _link(folder / label, source / entry.label)
        labels[entry.series_uid] = str(label)
        targets[entry.series_uid] = {"lesion": int(entry.lesion)}
    manifest = {"version": 1, "labels": labels, "targets": targets}
    atomic_write(folder / "manifest.json", json.dumps(manifest, indent=2).encode())


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():  # left by an interrupted earlier attempt
        link.unlink()
    os.symlink(target.resolve(), link)
