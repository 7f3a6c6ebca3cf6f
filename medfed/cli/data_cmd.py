"""`medfed data ...`: offline benchmark data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from medfed.cli.main import console

app = typer.Typer(help="Benchmark data that works offline.", no_args_is_help=True)


@app.command("synth")
def synth(
    out: Annotated[Path, typer.Option(help="output folder (new or empty)")],
    sites: Annotated[int, typer.Option(min=1, max=32, help="number of sites")] = 4,
    subjects: Annotated[int, typer.Option(min=2, help="subjects per site")] = 10,
    seed: Annotated[int, typer.Option(help="seed; same seed, same files")] = 0,
    overwrite: Annotated[bool, typer.Option(help="replace a previous synth output")] = False,
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="layouts to write, repeatable: dicom (always), nifti, msd, bids; "
            "each in site-N/<format>",
        ),
    ] = None,
) -> None:
    """Write synthetic brain MRI sites (DICOM + labels) built on the real MNI152 template.

    With --format nifti|msd|bids the same subjects are also written as a NIfTI folder,
    a Medical Segmentation Decathlon task or a BIDS dataset, read with data.kind =
    "nifti-folder", "msd" or "bids" and data.path = "DIR/site-N/<format>".
    """
    from medfed.synth import SUMMARY_HEADER, synthesize_sites

    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("synthesizing", total=sites * subjects)
        manifest = synthesize_sites(
            out,
            sites=sites,
            subjects_per_site=subjects,
            seed=seed,
            overwrite=overwrite,
            formats=tuple(fmt or ()),
            progress=lambda done, total, _name: bar.update(job, completed=done, total=total),
        )
    table = Table(*SUMMARY_HEADER)
    for row in manifest.summary_rows():
        table.add_row(*row)
    console.print(table)
    console.print(
        f"wrote {out} in {manifest.elapsed_s:.1f} s; what is real and what is "
        f"synthetic: {out / 'synth.json'}"
    )


@app.command("push")
def push(
    folder: Annotated[Path, typer.Argument(help="a folder of DICOM files, e.g. DIR/site-1/dicom")],
    to: Annotated[str, typer.Option("--to", help="the PACS's DICOMweb root URL")],
    credentials: Annotated[
        Path | None,
        typer.Option(
            help="credentials file (mode 600: username/password or token); default: the "
            "MEDFED_PACS_* environment variables"
        ),
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option(help="PEM CA that signs the PACS's certificate")
    ] = None,
) -> None:
    """Upload a folder of DICOM files to a PACS with STOW-RS (for tests and demos).

    The only medfed command that writes to a PACS; a site's dicomweb source only reads.
    """
    from medfed.core.config import PacsSection
    from medfed.data.pacs_push import push_folder

    pacs = PacsSection(url=to, credentials=str(credentials or ""), ca_bundle=str(ca_bundle or ""))
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("storing", total=None)
        result = push_folder(
            folder, pacs, progress=lambda done, total: bar.update(job, completed=done, total=total)
        )
    console.print(
        f"stored {result.files} DICOM files ({result.bytes / 1e6:.1f} MB) in "
        f"{result.seconds:.1f} s; {result.skipped} other files left out",
        highlight=False,
    )
