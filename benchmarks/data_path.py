"""Benchmark: a site's first DICOM decode versus reading it back from the series cache.

The script writes a synthetic site itself (default 20 series x 64 slices of
128 x 128, a third RLE Lossless, a third JPEG 2000 Lossless, the rest
uncompressed), then times two passes of a fresh
:class:`medfed.data.DicomFolderSource` that lists and loads every series:

* anchor: the first pass, cache cold: every header parsed, every file decoded,
  every series written to the cache;
* value: the second pass, a new source object on the same cache (as on the
  next round or after a daemon restart): headers come from the index, pixels
  from the ``.npz`` entries.

Both are reported in slices per second; ``ratio = value / anchor`` and the
target is a cached read at least 10x faster than the first decode. The last
line printed is the machine-readable ``BENCH`` line. ``--quick`` uses 4 series
x 16 slices.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from medfed.data import DicomFolderSource
from medfed.data.synthetic import SyntheticGeometry, write_series

SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless)


def make_site(root: Path, *, n_series: int, n_slices: int, size: int, seed: int = 0) -> int:
    """Write the synthetic site; returns the number of slices written."""
    rng = np.random.default_rng(seed)
    for s in range(n_series):
        base = rng.integers(0, 1500, size=(size, size, 1), dtype=np.int16)
        stored = (base + rng.integers(0, 50, size=(size, size, n_slices), dtype=np.int16))
        geometry = SyntheticGeometry(spacing=(0.8, 0.8, 2.0), origin=(-50.0, -50.0, 10.0 * s))
        write_series(root / f"study{s:02d}" / "series", stored.astype(np.int16), geometry=geometry,
                     slope=1.0, intercept=-1024.0, transfer_syntax=SYNTAXES[s % len(SYNTAXES)])
    return n_series * n_slices


def load_all(root: Path, cache: Path) -> int:
    """List and load every series with a new source; returns the slices loaded."""
    source = DicomFolderSource(root, cache_dir=cache)
    slices = 0
    for series in source.series():
        image, _ = source.load(series.series_uid)
        slices += int(image.shape[-1])
    return slices


def main() -> None:
    """Run the benchmark and print the BENCH line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 series x 16 slices")
    args = parser.parse_args()
    n_series, n_slices, size = (4, 16, 128) if args.quick else (20, 64, 128)
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        root, cache = Path(tmp) / "site", Path(tmp) / "cache"
        t0 = time.perf_counter()
        total = make_site(root, n_series=n_series, n_slices=n_slices, size=size)
        print(f"wrote {n_series} series x {n_slices} slices of {size}x{size} "
              f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        cold = load_all(root, cache)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = load_all(root, cache)
        warm_s = time.perf_counter() - t0
    assert cold == warm == total, (cold, warm, total)
    anchor, value = total / cold_s, total / warm_s
    print(f"first decode: {cold_s:.2f} s ({anchor:.0f} slices/s); "
          f"cached: {warm_s:.3f} s ({value:.0f} slices/s)")
    print(f"BENCH data_path cache_speedup value={value:.1f} anchor={anchor:.1f} "
          f"ratio={value / anchor:.2f} target>=10 unit=slices_per_s")


if __name__ == "__main__":
    main()
