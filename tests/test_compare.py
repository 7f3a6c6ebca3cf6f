"""`medfed compare`: strategies x adaptation hooks on one simulated federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import medfed


@pytest.mark.parametrize(("args", "message"), [
    (["-o", "fedadam:eta=0.1"], "names no strategy of this comparison"),
    (["-o", "fedprox:proximal_m=0.1"], "did you mean 'proximal_mu'"),
    (["--adaptations", "fedbm"], "did you mean 'fedbn'"),
])
def test_bad_input_is_refused_before_anything_starts(
        tmp_path: Path, args: list[str], message: str) -> None:
    out = medfed("compare", "--strategies", "fedavg,fedprox", *args, "--out",
                 str(tmp_path / "cmp"), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "cmp").exists()  # nothing was created or started


@pytest.mark.slow
def test_two_strategies_are_compared_on_the_same_sites(short_tmp: Path) -> None:
    out = medfed("compare", "--strategies", "fedavg,fedprox", "-o", "fedprox:proximal_mu=0.1",
                 "--sites", "2", "--rounds", "1", "--out", str(short_tmp / "cmp"),
                 cwd=short_tmp, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((short_tmp / "cmp" / "compare.json").read_text())
    runs = {r["strategy"]: r for r in result["runs"]}
    assert set(runs) == {"fedavg", "fedprox"}
    assert runs["fedprox"]["options"] == {"proximal_mu": 0.1}
    for r in runs.values():
        assert r["status"] == "completed" and r["adaptation"] == "none"
        assert set(r["sites"]) == {"site-1", "site-2"}
        assert 0.0 < r["mean"] <= 1.0
        assert r["mean"] == pytest.approx(sum(r["sites"].values()) / 2)
        assert Path(r["run_folder"], "summary.json").exists()
    assert "mean dice" in out.stdout and "fedprox" in out.stdout
