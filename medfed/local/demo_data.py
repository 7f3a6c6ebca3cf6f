"""Where the demo's sites read their data: generated in memory, a DICOM folder, or a PACS.

``synthetic`` leaves each site on its in-memory generator. ``dicom-folder`` writes
the offline benchmark (:func:`medfed.synth.synthesize_sites`) and points each site at
its own folder. ``dicomweb`` starts one real Orthanc per site (TLS, its own user),
uploads the site's folder with STOW-RS and points the site at its PACS: the site
fetches with QIDO-RS/WADO-RS into its cache at its first training, as a hospital
site would.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from medfed.core.errors import MedfedError

SOURCES = ("synthetic", "dicom-folder", "dicomweb")
#: Subjects per site when the demo writes files: enough for a train/validation split.
SUBJECTS_PER_SITE = 6

SiteData = Callable[[int, str], dict[str, Any]]


def prepare_demo_data(
    source: str,
    root: Path,
    sites: list[str],
    stack: ExitStack,
    *,
    say: Callable[[str], None] = print,
) -> SiteData | None:
    """The sites' ``[data]`` overrides for ``source``; servers started are closed by ``stack``."""
    if source not in SOURCES:
        raise MedfedError(
            f"unknown demo data source {source!r}", where="--source", expected=" | ".join(SOURCES)
        )
    if source == "synthetic":
        return None
    from medfed.synth import synthesize_sites

    if source == "dicomweb":
        from medfed.local.orthanc import INSTALL_HINT, orthanc_missing

        missing = orthanc_missing()
        if missing:  # before anything is written or started
            raise MedfedError(
                f"--source dicomweb needs a local Orthanc: {missing}", fix=INSTALL_HINT
            )
    data = root / "data"
    synthesize_sites(data, sites=len(sites), subjects_per_site=SUBJECTS_PER_SITE, seed=0)
    say(f"  wrote {len(sites)} sites x {SUBJECTS_PER_SITE} subjects of DICOM in {data}")
    if source == "dicom-folder":
        return lambda i, name: {
            "kind": "dicom-folder",
            "path": str(data / f"site-{i + 1}" / "dicom"),
            "manifest": str(data / f"site-{i + 1}" / "manifest.json"),
        }
    return _pacs_per_site(root, data, sites, stack, say)


def _pacs_per_site(
    root: Path, data: Path, sites: list[str], stack: ExitStack, say: Callable[[str], None]
) -> SiteData:
    from medfed.core.config import PacsSection
    from medfed.data.pacs_push import push_folder
    from medfed.local.orthanc import LocalOrthanc

    pacs: list[dict[str, Any]] = []
    for i, name in enumerate(sites):
        folder = root / "pacs" / name
        server = stack.enter_context(LocalOrthanc(folder, tls=True))
        credentials = server.write_credentials(folder / "credentials.toml")
        section = {
            "url": server.url,
            "credentials": str(credentials),
            "ca_bundle": str(server.ca_pem),
            "query": {"modality": "MR"},
        }
        pushed = push_folder(data / f"site-{i + 1}" / "dicom", PacsSection(**section))
        say(
            f"  {name}: Orthanc at {server.url} holds {pushed.files} DICOM files "
            f"({pushed.bytes / 1e6:.1f} MB, stored with STOW-RS in {pushed.seconds:.1f} s)"
        )
        pacs.append(section)
    return lambda i, name: {
        "kind": "dicomweb",
        "pacs": pacs[i],
        "manifest": str(data / f"site-{i + 1}" / "manifest.json"),
    }
