"""Shared fixtures: small builders, no network beyond 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary folder with a short path (Unix socket paths are limited to ~100 bytes)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="mf-", dir="/tmp"))
    yield path
    if os.environ.get("MEDFED_KEEP_TEST_DIRS"):  # for reading a failed test's logs
        print(f"kept {path}")
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file the volume decoder opens."""
    import medfed.data.volume as volume_module

    calls: list[Path] = []
    real = volume_module.decode_file

    def counting(path: Path) -> object:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(volume_module, "decode_file", counting)
    return calls
