"""Damaged data files heal; a missing data folder is a configuration error with its fix."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import medfed.data.index as index_module
from medfed.core.config import DataSourceConfig
from medfed.core.errors import ConfigError, MedfedError
from medfed.data import (
    DicomFolderSource,
    check_source_available,
    scan_source,
    take_healed,
)
from medfed.data.cache import read_entry
from medfed.data.scan import short_hash
from medfed.data.synthetic import SyntheticGeometry, write_seg, write_series


@pytest.fixture(autouse=True)
def _no_stale_notes() -> None:
    take_healed()  # notes are per process: start each test with none


def _site(root: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """A small series with a DICOM SEG label; returns its UID, pixels and labels."""
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(4)
    uid = generate_uid()
    stored = rng.integers(0, 1000, size=(6, 5, 4), dtype=np.int16)
    write_series(root / "ct", stored, geometry=SyntheticGeometry(), series_uid=uid)
    labels = np.zeros(stored.shape, np.int16)
    labels[1:4, 2:4, 1:3] = 1
    write_seg(root / "seg" / "seg.dcm", labels, geometry=SyntheticGeometry(), series_uid=uid)
    return uid, stored, labels


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _without(data: bytes, name: str) -> bytes:
    """The archive ``data`` with member ``name`` left out."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            if item.filename != f"{name}.npy":
                dst.writestr(item, src.read(item))
    return out.getvalue()


def _with(data: bytes, **arrays: np.ndarray) -> bytes:
    """The archive ``data`` with members replaced by ``arrays``."""
    with np.load(io.BytesIO(data)) as stored:
        merged = {k: stored[k] for k in stored.files}
    return _npz(**{**merged, **arrays})


def _flip_in_image(data: bytes) -> bytes:
    """One bit of the image's pixel bytes flipped (the archive's CRC no longer holds)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = z.getinfo("image.npy")
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated-half": lambda b: b[: len(b) // 2],
    "truncated-tail": lambda b: b[:-7],
    "empty": lambda b: b"",
    "zeroed": lambda b: bytes(len(b)),
    "garbage": lambda b: np.random.default_rng(0).bytes(len(b)),
    "bit-flip": _flip_in_image,
    "no-image": lambda b: _without(b, "image"),
    "no-label": lambda b: _without(b, "label"),
    "wrong-shape": lambda b: _with(
        b, image=np.zeros((1, 6, 5, 3), np.float32), label=np.zeros((6, 5, 3), np.int16)
    ),
    "wrong-dtype": lambda b: _with(b, image=np.zeros((1, 6, 5, 4), np.float64)),
    "bare-array": lambda b: _npy(np.zeros(3)),
}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_cache_entry_is_decoded_again_and_reported(
    damage: str, tmp_path: Path, decode_calls: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "site"
    uid, stored, labels = _site(root)
    first = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    first.load(uid)
    n_decoded = len(decode_calls)
    entry = first.cache.entry_path(uid)
    entry.write_bytes(DAMAGE[damage](entry.read_bytes()))

    # a restarted daemon (a new source) reads the damaged entry
    source = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="medfed.data"):
        image, label = source.load(uid)
    assert len(decode_calls) == 2 * n_decoded, "decoded again from the DICOM files"
    stats = source.cache.stats
    assert (stats.damaged, stats.healed, stats.writes, stats.hits) == (1, 1, 1, 0)
    (healed,) = take_healed()
    assert healed.file == entry.name and healed.series_id == short_hash(uid) and healed.reason
    assert str(tmp_path) not in healed.reason
    assert any(entry.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    # the entry is whole again: the next load is a hit
    read_entry(entry)
    source.load(uid)
    assert source.cache.stats.hits == 1 and len(decode_calls) == 2 * n_decoded
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")], "no temp files"
    # what the run gets is what a fresh decode gives
    fresh_image, fresh_label = DicomFolderSource(root, cache_dir=tmp_path / "fresh").load(uid)
    np.testing.assert_array_equal(image.numpy(), fresh_image.numpy())
    np.testing.assert_array_equal(image.affine.numpy(), fresh_image.affine.numpy())
    assert label is not None and fresh_label is not None
    np.testing.assert_array_equal(label.numpy(), fresh_label.numpy())
    np.testing.assert_array_equal(image.numpy()[0], stored)
    np.testing.assert_array_equal(label.numpy()[0], labels)


def test_a_tasks_subjects_are_unaffected_by_a_truncated_entry(tmp_path: Path) -> None:
    from medfed.tasks.imaging import dicom_subjects

    root = tmp_path / "site"
    uid, _, _ = _site(root / "a")
    _site(root / "b")
    source = DataSourceConfig(
        kind="dicom-folder", path=str(root), cache_dir=str(tmp_path / "cache")
    )
    before = dicom_subjects(source)
    entry = DicomFolderSource(root, cache_dir=tmp_path / "cache").cache.entry_path(uid)
    entry.write_bytes(entry.read_bytes()[:100])
    after = dicom_subjects(source)
    assert [s.key for s in after] == [s.key for s in before] and len(after) == 2
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(new.image.numpy(), old.image.numpy())
        assert new.label is not None and old.label is not None
        np.testing.assert_array_equal(new.label.numpy(), old.label.numpy())
    assert [h.series_id for h in take_healed()] == [short_hash(uid)]


def test_a_changed_source_is_a_plain_miss_not_damage(tmp_path: Path) -> None:
    root = tmp_path / "site"
    uid, _, _ = _site(root)
    source = DicomFolderSource(root, cache_dir=tmp_path / "cache")
    source.load(uid)
    a_file = next((root / "ct").iterdir())
    stat = a_file.stat()
    os.utime(a_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    source.load(uid)
    assert source.cache.stats.damaged == 0 and source.cache.stats.writes == 2
    assert take_healed() == ()


@pytest.mark.parametrize("damage", ["truncated", "not-json", "wrong-type", "bad-entry"])
def test_a_damaged_header_index_is_read_again_and_reported(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "site"
    uid, _, _ = _site(root)
    DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    index = tmp_path / "cache" / "index.json"
    text = index.read_text()
    index.write_text(
        {
            "truncated": text[: len(text) // 2],
            "not-json": "\0" * 40,
            "wrong-type": "[1, 2]",
            "bad-entry": text.replace('"record": {', '"record": {"x": 1, ', 1).replace(
                '"skipped": {', '"skipped": {"x": 1, ', 1
            ),
        }[damage]
    )
    calls: list[Path] = []
    real = index_module.read_record

    def counting(path: Path, root: Path, *, decode: bool = False):  # type: ignore[no-untyped-def]
        calls.append(path)
        return real(path, root, decode=decode)

    monkeypatch.setattr(index_module, "read_record", counting)
    with caplog.at_level(logging.WARNING, logger="medfed.data"):
        (series,) = DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    assert series.series_uid == uid and calls, "headers read again"
    (healed,) = take_healed()
    assert healed.file == "index.json" and healed.reason
    assert any("index.json" in r.getMessage() for r in caplog.records)
    calls.clear()
    DicomFolderSource(root, cache_dir=tmp_path / "cache").series()
    assert calls == [] and take_healed() == (), "the rewritten index is whole"


def test_scan_removes_and_reports_damaged_entries_and_crash_leftovers(tmp_path: Path) -> None:
    root = tmp_path / "site"
    uid, _, _ = _site(root)
    cache = tmp_path / "cache"
    DicomFolderSource(root, cache_dir=cache).load(uid)
    (cache / "series-0123.npz").write_bytes(b"PK\x03\x04 cut short")
    leftover = cache / ".series-0123.npz.abc.npz"
    leftover.write_bytes(b"half")
    os.utime(leftover, (time.time() - 7200, time.time() - 7200))
    recent = cache / ".series-4567.npz.def.npz"  # maybe a writer at work: left alone
    recent.write_bytes(b"half")
    source = DataSourceConfig(kind="dicom-folder", path=str(root), cache_dir=str(cache))
    report = scan_source(source, decode=False)
    assert report.cache is not None and report.cache.entries == 2
    (damaged,) = report.cache.damaged
    assert damaged.file == "series-0123.npz" and "BadZipFile" in damaged.reason
    assert report.cache.leftovers == 1 and not leftover.exists() and recent.exists()
    assert not (cache / "series-0123.npz").exists()
    assert "1 damaged entries removed" in report.render_text()
    shared = report.to_dict()["cache"]
    assert shared["entries"] == 2 and shared["temporary_files_removed"] == 1
    assert shared["damaged_removed"] == [{"reason": damaged.reason}], "no file names shared"
    assert scan_source(source, decode=False).cache.damaged == ()  # type: ignore[union-attr]


# ------------------------------------------------------------------ missing data folder


def _dicom_source(**kwargs: str) -> DataSourceConfig:
    return DataSourceConfig(kind="dicom-folder", **{"path": "dicom", **kwargs})


def test_a_missing_folder_names_the_key_the_path_and_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    with pytest.raises(ConfigError) as caught:
        check_source_available(config, _dicom_source())
    error = caught.value
    assert "does not exist" in error.what
    assert "data.path = 'dicom'" in error.where and str(tmp_path / "dicom") in error.where
    assert "medfed site scan" in error.fix and "mount" in error.fix


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("x"), "not a folder"),
        (lambda p: (p.mkdir(), (p / ".medfed-cache").mkdir()), "is empty"),
    ],
)
def test_a_file_or_an_empty_folder_is_refused(
    make: Callable[[Path], object], message: str, tmp_path: Path
) -> None:
    make(tmp_path / "dicom")
    with pytest.raises(ConfigError, match=message):
        check_source_available(tmp_path / "site.toml", _dicom_source())


def test_a_named_manifest_that_is_missing_is_refused(tmp_path: Path) -> None:
    _site(tmp_path / "dicom")
    with pytest.raises(ConfigError, match="manifest") as caught:
        check_source_available(tmp_path / "site.toml", _dicom_source(manifest="labels.json"))
    assert "data.manifest" in caught.value.where


def test_a_present_folder_passes_resolved_and_synthetic_data_has_nothing_to_miss(
    tmp_path: Path,
) -> None:
    _site(tmp_path / "dicom")
    resolved = check_source_available(tmp_path / "site.toml", _dicom_source())
    assert resolved.path == str(tmp_path / "dicom")
    assert resolved.cache_dir == str(tmp_path / "cache")
    synthetic = DataSourceConfig(kind="synthetic")
    assert check_source_available(tmp_path / "site.toml", synthetic) == synthetic


def _site_folder(short_tmp: Path) -> Path:
    from medfed.client.site import init_site
    from medfed.core.identity import CertificateAuthority
    from medfed.core.procs import free_port

    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    config = init_site(
        short_tmp / "s", name="s", federation_ca=short_tmp / "ca.pem", runtime_port=free_port()
    )
    text = config.read_text()
    config.write_text(
        text.replace('kind = "synthetic"', 'kind = "dicom-folder"').replace(
            'path = ""', 'path = "dicom"', 1
        )
    )
    return config


def test_site_start_refuses_a_missing_folder_before_starting_anything(short_tmp: Path) -> None:
    from medfed.client.daemon import SiteDaemon

    daemon = SiteDaemon(_site_folder(short_tmp))
    with pytest.raises(ConfigError, match="DICOM folder does not exist") as caught:
        daemon.start()
    assert "data.path" in caught.value.where and "medfed site scan" in caught.value.fix
    assert daemon.worker is None and daemon.supernode is None
    assert not (short_tmp / "s" / "run").exists(), "no worker socket bound"


def test_a_run_on_a_vanished_folder_fails_without_telling_the_coordinator_its_path(
    tmp_path: Path,
) -> None:
    from medfed.client.worker import SiteWorker
    from medfed.core import wire
    from medfed.core.config import RunConfig, SiteConfig, validate

    cfg = validate(
        SiteConfig,
        {
            "site": {"name": "site-x"},
            "compute": {"threads": 1},
            "data": {"kind": "dicom-folder", "path": "gone"},
        },
        where="test",
    )
    worker = SiteWorker(cfg, tmp_path / "site.toml")
    run = RunConfig(secure_aggregation="off", task="brain-tissue-seg")
    reply = worker.handle(
        wire.Frame(
            {
                "op": "train",
                "run_id": 7,
                "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: 1},
            }
        )
    )
    reason = reply.header["reason"]
    assert reply.header["status"] == "failed" and "does not exist" in reason
    assert str(tmp_path) not in reason and "gone" not in reason
    assert str(tmp_path / "gone") in worker.audit.read()[-1]["reason"], "the site's log has it"


def test_reply_reason_keeps_paths_at_the_site() -> None:
    from medfed.client.worker import _reply_reason

    error = MedfedError("it broke", where="/hospital/x", expected="y", fix="do z")
    assert _reply_reason(error) == "MedfedError: it broke\n  expected: y\n  fix:      do z"
    missing = FileNotFoundError(2, "No such file or directory", "/hospital/a.npz")
    assert _reply_reason(missing) == (
        "FileNotFoundError: No such file or directory (the file is named in the site's log)"
    )
    assert _reply_reason(ValueError("bad")) == "ValueError: bad"


def _medfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed", *args], capture_output=True, text=True, timeout=120
    )


def test_site_scan_and_start_exit_2_on_a_missing_folder(short_tmp: Path) -> None:
    config = _site_folder(short_tmp)
    for command in ("scan", "start"):
        out = _medfed("site", command, "--config", str(config))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "DICOM folder does not exist" in out.stderr and "data.path" in out.stderr
        assert "medfed site scan" in out.stderr
        assert "Traceback" not in out.stderr + out.stdout
    _site(short_tmp / "s" / "dicom")
    cache = short_tmp / "s" / "cache"
    cache.mkdir()
    (cache / "series-0123.npz").write_bytes(b"")
    out = _medfed("site", "scan", "--config", str(config), "--no-decode")
    assert out.returncode == 0, out.stderr
    assert "1 series" in out.stdout and "1 damaged entries removed" in out.stdout
