"""Upload a folder of DICOM files to a PACS with STOW-RS (`medfed data push`), for tests and demos.

The one place medfed writes to a PACS; a site's data source only reads
(:mod:`medfed.data.dicomweb`). Files go in batches so that memory stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medfed.core.config import PacsSection
from medfed.core.errors import MedfedError
from medfed.data.dicomweb import pacs_client, pacs_errors

BATCH = 64


@dataclass(frozen=True)
class PushResult:
    """Counts of one push."""

    files: int
    skipped: int
    bytes: int
    seconds: float


def push_folder(
    folder: Path, pacs: PacsSection, *, progress: Callable[[int, int], None] | None = None
) -> PushResult:
    """Store every DICOM file under ``folder`` (hidden folders aside) on the PACS."""
    if not folder.is_dir():
        raise MedfedError(
            "no such folder",
            where=str(folder),
            expected="a folder of DICOM files, e.g. DIR/site-1/dicom of `medfed data synth`",
        )
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    client = pacs_client(pacs, where="--to")
    started = time.perf_counter()
    done = skipped = size = 0
    batch: list[pydicom.Dataset] = []

    def flush() -> None:
        with pacs_errors(pacs.url, f"storing (STOW-RS; {done} files stored)"):
            client.store_instances(batch)
        batch.clear()

    for path in files:
        try:
            batch.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError):
            skipped += 1  # labels (NIfTI), manifests: not DICOM
            continue
        size += path.stat().st_size
        if len(batch) == BATCH:
            flush()
        done += 1
        if progress is not None:
            progress(done, len(files))
    if batch:
        flush()
    return PushResult(
        files=done, skipped=skipped, bytes=size, seconds=time.perf_counter() - started
    )
