"""keep_checkpoints: a run keeps its last N global models and says when they will not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli import medfed

from medfed.core.config import RunConfig
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.packing import Layout
from medfed.core.runs import RunFolder
from medfed.core.warm_start import load_start_weights
from medfed.local.sim_sites import synthetic_sites
from medfed.local.simulation import simulate
from medfed.server.app import checkpoint_space_warning

WEIGHTS = {"w": np.zeros(3, np.float32)}


def saved(folder: RunFolder, rounds: range) -> None:
    for r in rounds:
        folder.save_checkpoint(r, {"w": WEIGHTS["w"] + r})


def test_pruning_keeps_the_last_rounds_in_round_order(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "7")
    saved(folder, range(995, 1003))  # round-1000 sorts after round-999 by number, not by name
    stray = folder.path / "checkpoints" / ".round-1003.npz.tmp.npz"  # a killed atomic write
    stray.write_bytes(b"")
    assert folder.saved_rounds() == list(range(995, 1003))
    gone = folder.prune_checkpoints(3)
    assert [p.name for p in gone] == [f"round-{r}.npz" for r in range(995, 1000)]
    assert folder.saved_rounds() == [1000, 1001, 1002] and stray.exists()
    assert folder.prune_checkpoints(3) == []  # nothing more to do
    assert folder.prune_checkpoints(0) == [] and folder.saved_rounds() == [1000, 1001, 1002]


def test_a_pruned_round_named_for_a_warm_start_is_refused_with_the_kept_ones(
    tmp_path: Path,
) -> None:
    folder = RunFolder(tmp_path / "7")
    saved(folder, range(1, 5))
    folder.prune_checkpoints(2)
    with pytest.raises(MedfedError, match="no such checkpoint") as info:
        load_start_weights(tmp_path, "7:1", Layout.of(WEIGHTS))
    assert "a round the run kept: 3, 4" in str(info.value)
    path, weights = load_start_weights(tmp_path, "7", Layout.of(WEIGHTS))
    assert path.name == "round-004.npz" and weights["w"][0] == 4


def test_checkpoints_that_will_not_fit_are_announced(tmp_path: Path) -> None:
    run = RunConfig(task="tiny-seg", rounds=100)
    fifty_m = 50_000_000  # 200 MB a round: 20 GB for 100 rounds
    warning = checkpoint_space_warning(run, fifty_m, 10 * 1024**3, tmp_path)
    assert warning is not None
    assert "18.63 GiB (100 rounds" in warning and "10.00 GiB free" in warning
    assert "--keep-checkpoints" in warning and str(tmp_path) in warning
    kept = run.model_copy(update={"keep_checkpoints": 5})
    assert checkpoint_space_warning(kept, fifty_m, 10 * 1024**3, tmp_path) is None
    assert checkpoint_space_warning(run, fifty_m, 20 * 1024**3, tmp_path) is None


def test_a_negative_count_is_refused() -> None:
    from medfed.core.config import validate

    with pytest.raises(ConfigError, match="keep_checkpoints"):
        validate(RunConfig, {"task": "tiny-seg", "keep_checkpoints": -1}, where="test")


def test_a_run_keeping_one_checkpoint_ends_with_the_final_model_only(tmp_path: Path) -> None:
    out = medfed(
        "simulate",
        *("--task", "tiny-seg", "--sites", "3", "--min-sites", "3", "--rounds", "3"),
        *("--secure-aggregation", "off", "--keep-checkpoints", "1"),
        *("--out", str(tmp_path / "runs")),
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (tmp_path / "runs").glob("*/checkpoints")
    folder = RunFolder(path.parent)
    assert folder.read_summary().final_checkpoint == "round-003.npz"
    assert folder.saved_rounds() == [3]
    assert "`checkpoints/round-003.npz` (rounds kept: 3; keep_checkpoints)" in (
        folder.report_file.read_text()
    )
    finished = [e for e in folder.read_events() if e.is_("round-finished")]
    assert [e.round for e in finished] == [1, 2, 3]  # every round ran; two were let go
    # the next run starts from it
    warm = RunConfig(
        task="tiny-seg", rounds=1, min_sites=3, secure_aggregation="off", init_from=path.parent.name
    )
    again, second = simulate(warm, synthetic_sites(3), tmp_path / "runs", keep_warm=0)
    assert second.status == "completed", second.reason
    started = [e for e in again.read_events() if e["event"] == "initial-model"]
    assert started[0]["source"].endswith("checkpoints/round-003.npz")
    refused = medfed("simulate", "--task", "tiny-seg", "--keep-checkpoints", "-1", cwd=tmp_path)
    assert refused.returncode == 2 and "--keep-checkpoints" in refused.stderr


def test_a_checkpoint_that_cannot_be_deleted_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medfed.server.app import _prune_checkpoints

    folder = RunFolder(tmp_path / "7")
    saved(folder, range(1, 4))

    def refused(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    _prune_checkpoints(folder, 1)  # the run goes on
    (warning,) = [e for e in folder.read_events() if e.is_("warning")]
    assert "old checkpoints were not deleted" in warning["reason"]
    assert "round-001.npz" in warning["reason"] and folder.saved_rounds() == [1, 2, 3]
