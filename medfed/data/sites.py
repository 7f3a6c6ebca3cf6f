"""Data sources of a folder of site folders, for baselines and benchmarks.

The layout is ``DIR/site-N/{dicom/, manifest.json}``, as `medfed data synth` writes it.
"""

from __future__ import annotations

from pathlib import Path

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError


def site_sources(
    data_dir: Path, *, seed: int = 0, val_fraction: float = 0.25
) -> dict[str, DataSourceConfig]:
    """One ``dicom-folder`` data source per site folder under ``data_dir``, by site name."""
    data_dir = Path(data_dir).resolve()
    sites = (
        sorted(p for p in data_dir.iterdir() if (p / "dicom").is_dir()) if data_dir.is_dir() else []
    )
    if not sites:
        raise MedfedError(
            "No site folders found.",
            where=str(data_dir),
            expected="sub-folders site-N/ each holding dicom/ (and manifest.json for labels)",
            fix=f"create them with `medfed data synth --out {data_dir}`",
        )
    out = {}
    for site in sites:
        manifest = site / "manifest.json"
        out[site.name] = DataSourceConfig(
            kind="dicom-folder",
            path=str(site / "dicom"),
            manifest=str(manifest) if manifest.exists() else "",
            cache_dir=str(site / "cache"),
            seed=seed,
            val_fraction=val_fraction,
        )
    return out
