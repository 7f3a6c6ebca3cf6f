"""A test split that training never reads: held-out subjects moved to a folder of their own.

A site's data source splits its subjects into train and validation (``val_fraction``,
used for every tuning and recipe choice). A figure that holds up under review comes
from a third split, touched once at the end. :func:`hold_out_test` moves a seeded
choice of subjects out of each site folder of a `medfed data synth` output into the
same layout under another folder, so nothing a federation, a baseline or a recipe
search reads can see them: the site folders left behind are complete sites
(``manifest.json`` rewritten), and so are the held-out ones.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_write
from medfed.synth.sites import SiteManifest, read_site_manifest

_HOLDOUT_STREAM = 0x7E57


def _write_manifest(site_dir: Path, manifest: SiteManifest) -> None:
    atomic_write(site_dir / "manifest.json", json.dumps(manifest.as_dict(), indent=2).encode())


def hold_out_test(
    data_dir: Path, test_dir: Path, *, per_site: int, seed: int
) -> dict[str, list[str]]:
    """Move ``per_site`` subjects of every site under ``data_dir`` to ``test_dir``.

    The choice depends on ``seed`` and each site's subject names only; with lesion
    subjects at a site, both kinds are held out in proportion (alternating from a
    seeded order). Returns the held-out subjects by site, also written to
    ``test_dir/holdout.json``.

    Raises
    ------
    MedfedError
        No site folders, a site that would keep fewer than 2 subjects (train and
        validation need one each), a site folder with other formats or a decoded
        cache, or a ``test_dir`` that already holds a site.
    """
    data_dir, test_dir = Path(data_dir), Path(test_dir)
    sites = sorted(p for p in data_dir.iterdir() if (p / "manifest.json").is_file())
    if not sites:
        raise MedfedError(
            "No site folders with a manifest.json found.",
            where=str(data_dir),
            expected="the output of `medfed data synth`",
            fix=f"create it with `medfed data synth --out {data_dir}`",
        )
    if per_site < 1:
        raise MedfedError(f"per_site must be at least 1, got {per_site}", where="hold_out_test")
    chosen: dict[str, list[str]] = {}
    for site_dir in sites:
        manifest = read_site_manifest(site_dir)
        if len(manifest.series) - per_site < 2:
            raise MedfedError(
                f"holding out {per_site} subjects would leave {len(manifest.series) - per_site}",
                where=str(site_dir),
                expected="at least 2 subjects left for training and validation",
                fix="synthesize more subjects per site (--subjects) or hold out fewer",
            )
        extra = sorted(
            p.name for p in site_dir.iterdir() if p.name not in ("dicom", "labels", "manifest.json")
        )
        if extra:
            raise MedfedError(
                f"the site folder holds more than one format ({', '.join(extra)})",
                where=str(site_dir),
                expected="dicom/, labels/ and manifest.json only",
                fix="synthesize with the default format (no --formats) before holding out",
            )
        if (test_dir / site_dir.name).exists():
            raise MedfedError(
                "the test folder already holds this site",
                where=str(test_dir / site_dir.name),
                fix="hold out into an empty folder",
            )
        rng = np.random.default_rng([seed, _HOLDOUT_STREAM, int(site_dir.name.split("-")[-1])])
        by_kind = {
            kind: [
                e
                for e in sorted(manifest.series.values(), key=lambda e: e.subject)
                if e.lesion == kind
            ]
            for kind in (True, False)
        }
        queues = {k: [v[i] for i in rng.permutation(len(v))] for k, v in by_kind.items()}
        picked = []
        kind = bool(rng.random() < 0.5)
        while len(picked) < per_site:
            if not queues[kind]:
                kind = not kind
            picked.append(queues[kind].pop(0))
            kind = not kind
        out = test_dir / site_dir.name
        (out / "dicom").mkdir(parents=True)
        (out / "labels").mkdir()
        for entry in picked:
            shutil.move(str(site_dir / entry.dicom), str(out / entry.dicom))
            shutil.move(str(site_dir / entry.label), str(out / entry.label))
        held = {e.series_uid for e in picked}
        _write_manifest(
            out,
            dataclasses.replace(
                manifest, series={u: e for u, e in manifest.series.items() if u in held}
            ),
        )
        _write_manifest(
            site_dir,
            dataclasses.replace(
                manifest, series={u: e for u, e in manifest.series.items() if u not in held}
            ),
        )
        chosen[site_dir.name] = sorted(e.subject for e in picked)
    atomic_write(
        test_dir / "holdout.json",
        json.dumps({"from": str(data_dir), "seed": seed, "subjects": chosen}, indent=2).encode(),
    )
    return chosen
