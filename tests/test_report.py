"""The run plot: one panel per series the sites actually sent."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from medfed.core.report import plot_metrics, plot_panels


def _png_width(path: Path) -> int:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", header[16:20])[0]


def _rows(dp: bool) -> list[dict]:
    rows = []
    for rnd in (1, 2):
        for site in ("site-a", "site-b"):
            rows.append({"phase": "evaluate", "round": rnd, "site": site, "dice": 0.5 + rnd / 10})
            train = {"phase": "train", "round": rnd, "site": site}
            train.update({"epsilon-run": 0.4 * rnd} if dp else {"train-loss": 1.0 / rnd})
            rows.append(train)
    return rows


@pytest.mark.parametrize(("dp", "second"), [(False, "train-loss"), (True, "epsilon-run")])
def test_a_dp_run_plots_epsilon_and_no_training_loss(tmp_path: Path, dp: bool,
                                                     second: str) -> None:
    rows = _rows(dp)
    assert plot_panels(rows, "dice") == [("dice", "evaluate"), (second, "train")]
    out = plot_metrics(rows, "dice", tmp_path / "m.png", title="t")
    assert _png_width(out) == 550 * 2  # 5.5 in per panel at 100 dpi


def test_evaluation_alone_gives_one_panel(tmp_path: Path) -> None:
    rows = [r for r in _rows(dp=True) if r["phase"] == "evaluate"]
    assert plot_panels(rows, "dice") == [("dice", "evaluate")]
    assert _png_width(plot_metrics(rows, "dice", tmp_path / "m.png", title="t")) == 550
