"""The per-site cache: hit on the second load, invalidated when a source file changes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import medfed.data.index as index_module
from medfed.data import DicomFolderSource, SeriesCache, fingerprint
from medfed.data.cache import CachedSeries
from medfed.data.synthetic import SyntheticGeometry, write_series


def _site(tmp_path: Path) -> tuple[Path, list[Path], np.ndarray]:
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 1000, size=(6, 5, 4), dtype=np.int16)
    paths = write_series(tmp_path / "site", stored, geometry=SyntheticGeometry())
    return tmp_path / "site", paths, stored


def test_second_load_is_served_from_cache(tmp_path: Path, decode_calls: list[Path]) -> None:
    root, paths, stored = _site(tmp_path)
    first = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    uid = first.series()[0].series_uid
    image1, _ = first.load(uid)
    assert len(decode_calls) == len(paths)
    again, _ = first.load(uid)
    # A new source (a new round, a restarted daemon) reads the same cache.
    second = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    image2, _ = second.load(uid)
    assert len(decode_calls) == len(paths), "no decode on cached loads"
    assert first.cache.stats.hits == 1 and second.cache.stats.hits == 1
    np.testing.assert_array_equal(image2.numpy(), image1.numpy())
    np.testing.assert_array_equal(image2.affine.numpy(), image1.affine.numpy())
    np.testing.assert_array_equal(image2.numpy()[0], stored)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]


def test_headers_are_not_reparsed_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, paths, _ = _site(tmp_path)
    DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    calls: list[Path] = []
    real = index_module.read_record

    def counting(path: Path, root: Path, *, decode: bool = False):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real(path, root, decode=decode)

    monkeypatch.setattr(index_module, "read_record", counting)
    DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    assert calls == []
    os.utime(paths[0], ns=(paths[0].stat().st_atime_ns, paths[0].stat().st_mtime_ns + 10**9))
    DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    assert calls == [paths[0]]


@pytest.mark.parametrize("change", ["touch", "rewrite"])
def test_changed_source_file_invalidates_the_entry(
    change: str, tmp_path: Path, decode_calls: list[Path]
) -> None:
    root, paths, stored = _site(tmp_path)
    source = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    uid = source.series()[0].series_uid
    source.load(uid)
    n_first = len(decode_calls)
    target = paths[2]
    stat = target.stat()
    if change == "touch":
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    else:  # same size, new pixels: slice z=2 becomes all 7
        write_series(
            tmp_path / "other",
            np.full(stored.shape, 7, np.int16),
            geometry=SyntheticGeometry(),
            series_uid=uid,
        )
        data = (tmp_path / "other" / target.name).read_bytes()
        target.write_bytes(data)
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    image, _ = source.load(uid)
    assert len(decode_calls) == 2 * n_first, "the whole series is decoded again"
    if change == "rewrite":
        assert np.all(image.numpy()[0, :, :, 2] == 7)
    source.load(uid)
    assert len(decode_calls) == 2 * n_first, "and cached again"


def test_cache_entry_round_trips_and_rejects_a_foreign_fingerprint(tmp_path: Path) -> None:
    cache = SeriesCache(tmp_path / "cache")
    image = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    label = np.ones((1, 2, 3, 4)[1:], np.int16)
    cache.put("1.2.3", "abc", CachedSeries(image=image, affine=np.eye(4), label=label))
    found = cache.get("1.2.3", "abc")
    assert found is not None and found.label is not None
    np.testing.assert_array_equal(found.image, image)
    np.testing.assert_array_equal(found.label, label)
    assert cache.get("1.2.3", "other") is None
    cache.entry_path("1.2.3").write_bytes(b"garbage")  # a damaged entry is a miss, not a crash
    assert cache.get("1.2.3", "abc") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.writes) == (1, 2, 1)


def test_fingerprint_follows_size_and_mtime(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    before = fingerprint(tmp_path, ["a"])
    assert fingerprint(tmp_path, ["a"]) == before
    os.utime(tmp_path / "a", ns=(0, 10**9))
    assert fingerprint(tmp_path, ["a"]) != before
