"""Is a site's data there? Checked before anything runs, answered with the fix.

A missing DICOM folder (a share not mounted, a path mistyped in site.toml) is a
configuration error at the site: `medfed site start` refuses to start and `medfed
site scan` exits non-zero, both saying which site.toml key, which path and what to
do. It is not left to fail every run, where the error would travel to the
coordinator with the site's local paths in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from medfed.core.config import DataSourceConfig, resolve, resolve_data_source
from medfed.core.errors import ConfigError


def check_source_available(config_path: Path, source: DataSourceConfig) -> DataSourceConfig:
    """``source`` with absolute paths, once its files are there; else a ConfigError.

    A folder source (DICOM, NIfTI, MSD, BIDS) has files to miss: its folder must
    exist, be readable and hold something (an empty folder is most often a share
    that is not mounted); a manifest or targets file named in site.toml must exist;
    the cache folder must be writable. A ``synthetic`` source is returned as it is.

    Parameters
    ----------
    config_path : Path
        The site.toml that declared ``source`` (relative paths start at its folder).
    source : DataSourceConfig
        Its ``[data]`` table as written.

    Raises
    ------
    ConfigError
        Naming the site.toml key, the path and the fix.
    """
    resolved = resolve_data_source(config_path, source)
    if resolved.kind == "synthetic":
        return resolved
    if resolved.kind == "dicomweb":  # reached at scan or training; the cache must take it
        _require_writable(
            Path(resolved.cache_dir),
            where=f"{config_path} key data.cache_dir = {source.cache_dir!r} ({resolved.cache_dir})",
        )
        return resolved
    if resolved.kind != "dicom-folder":
        key = f"{config_path} key data.path = {source.path!r}"
        what = {"msd": "MSD task folder", "bids": "BIDS dataset"}.get(resolved.kind, "NIfTI folder")
        require_folder(
            Path(resolved.path),
            where=f"{key} ({resolved.path})",
            what=what,
            fix="mount or restore the folder, or set data.path in site.toml to the "
            f"{what}; then check it with "
            f"`medfed site scan --config {config_path}`",
        )
        if resolved.targets and not Path(resolved.targets).is_file():
            raise ConfigError(
                "The site's targets file does not exist.",
                where=f"{config_path} key data.targets = {source.targets!r} ({resolved.targets})",
                expected="a JSON or TSV/CSV file of per-subject targets",
                fix='restore the file, or set data.targets = "" to use the default',
            )
        _require_writable(
            Path(resolved.cache_dir),
            where=f"{config_path} key data.cache_dir = {source.cache_dir!r} ({resolved.cache_dir})",
        )
        return resolved
    key = f"{config_path} key data.path = {source.path!r}"
    require_folder(
        Path(resolved.path),
        where=f"{key} ({resolved.path})",
        fix="mount or restore the folder, or set data.path in site.toml to the "
        "folder that holds the site's DICOM files; then check it with "
        f"`medfed site scan --config {config_path}`",
    )
    if source.manifest and not resolved.manifest:
        raise ConfigError(
            "The site's label manifest does not exist.",
            where=f"{config_path} key data.manifest = {source.manifest!r} "
            f"({resolve(config_path, source.manifest)})",
            expected="a manifest JSON file (see `medfed data synth` for an example)",
            fix='restore the file, or set data.manifest = "" to use '
            "<data.path>/manifest.json when there is one",
        )
    _require_writable(
        Path(resolved.cache_dir),
        where=f"{config_path} key data.cache_dir = {source.cache_dir!r} ({resolved.cache_dir})",
    )
    return resolved


def require_folder(
    root: Path,
    *,
    where: str = "",
    fix: str = "",
    allow_empty: bool = False,
    what: str = "DICOM folder",
) -> None:
    """Raise a ConfigError unless ``root`` is a readable folder with at least one entry.

    Hidden entries (such as a cache folder inside it) do not count: they are never
    scanned. With ``allow_empty`` an empty folder passes.
    """
    where = where or str(root)
    fix = fix or (
        "mount or restore the folder, or correct data.path in site.toml; then "
        "check it with `medfed site scan`"
    )
    expected = (
        "a folder of DICOM files (any layout)" if what == "DICOM folder" else f"the {what}"
    ) + " readable by the user running medfed"
    if not root.exists():
        raise ConfigError(
            f"The site's {what} does not exist.", where=where, expected=expected, fix=fix
        )
    if not root.is_dir():
        raise ConfigError(
            f"The site's {what} is not a folder.", where=where, expected=expected, fix=fix
        )
    try:
        with os.scandir(root) as entries:
            empty = all(e.name.startswith(".") for e in entries)
    except OSError as exc:
        raise ConfigError(
            f"The site's {what} cannot be read ({exc.strerror}).",
            where=where,
            expected=expected,
            fix=fix,
        ) from None
    if empty and not allow_empty:
        raise ConfigError(
            f"The site's {what} is empty (a share that is not mounted?).",
            where=where,
            expected=expected,
            fix=fix,
        )


def _require_writable(folder: Path, *, where: str) -> None:
    """Raise a ConfigError unless ``folder`` is, or can be created as, a writable folder."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    raise ConfigError(
        "The site's cache folder cannot be written.",
        where=where if existing == folder else f"{where}; {existing} is not a writable folder",
        expected="a folder the user running medfed may write (decoded series go there)",
        fix="make it writable, or set data.cache_dir in site.toml to a writable folder",
    )
