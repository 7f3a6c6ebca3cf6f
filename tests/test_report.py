"""The run plot: one panel per series the sites actually sent."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from medfed.core.report import LABELLED_SITES_MAX, panel_lines, plot_metrics, plot_panels
from medfed.core.run_summary import RunSummary


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
def test_a_dp_run_plots_epsilon_and_no_training_loss(tmp_path: Path, dp: bool, second: str) -> None:
    rows = _rows(dp)
    assert plot_panels(rows, "dice") == [("dice", "evaluate"), (second, "train")]
    out = plot_metrics(rows, "dice", tmp_path / "m.png", title="t")
    assert _png_width(out) == 550 * 2  # 5.5 in per panel at 100 dpi


def test_evaluation_alone_gives_one_panel(tmp_path: Path) -> None:
    rows = [r for r in _rows(dp=True) if r["phase"] == "evaluate"]
    assert plot_panels(rows, "dice") == [("dice", "evaluate")]
    assert _png_width(plot_metrics(rows, "dice", tmp_path / "m.png", title="t")) == 550


def test_a_few_sites_get_a_line_each_and_many_a_bundle_with_their_median(tmp_path: Path) -> None:
    def series(n: int) -> dict[str, list[tuple[int, float]]]:
        out = {f"site-{i}": [(1, 0.1 * (i % 5)), (2, 0.2 + 0.1 * (i % 5))] for i in range(n)}
        return {**out, "global": [(1, 0.3), (2, 0.5)]}

    few = [label for label, *_ in panel_lines(series(3))]
    assert few == ["site-0", "site-1", "site-2", "global"]
    many = panel_lines(series(LABELLED_SITES_MAX + 30))
    assert [label for label, *_ in many if label] == [
        f"{LABELLED_SITES_MAX + 30} sites",
        "site median",
        "global",
    ]
    median_line = next(line for line in many if line[0] == "site median")
    assert median_line[1:3] == ([1, 2], [0.2, 0.4])  # per round, of the sites only
    rows = [
        {"phase": "evaluate", "round": r, "site": s, "dice": v}
        for s, points in series(200).items()
        for r, v in points
    ]
    assert _png_width(plot_metrics(rows, "dice", tmp_path / "m.png", title="t")) == 550


def test_the_run_report_tells_protection_scores_epsilon_and_refusals(tmp_path: Path) -> None:
    from medfed.core.config import RunConfig
    from medfed.core.run_report import write_report
    from medfed.core.runs import RunFolder

    folder = RunFolder.create(
        tmp_path,
        42,
        RunConfig(
            task="tiny-seg",
            rounds=2,
            strategy="fedprox",
            strategy_options={"proximal_mu": 0.1},
            privacy={"mode": "sample", "target_epsilon": 8.0, "max_grad_norm": 0.3},
        ),
    )
    folder.event(
        "site-replied", round=0, phase="query", site="site-a", metrics={"fitted-noise": 0.9}
    )
    for rnd in (1, 2):
        for site, z in (("site-a", 0.9), ("site-b", 1.1)):
            if (rnd, site) == (2, "site-b"):
                folder.event(
                    "site-error",
                    round=2,
                    phase="train",
                    site="site-b",
                    node=5,
                    status="refused",
                    rule="privacy.datasets.default.epsilon_max",
                    reason="Privacy budget exceeded (remaining 0.5).",
                )
                continue
            folder.metrics(rnd, site, "train", {"epsilon-run": 4.0 * rnd, "noise-multiplier": z})
        folder.metrics(rnd, "global", "evaluate", {"dice": 0.5 + rnd / 10})
        folder.event("round-finished", round=rnd, seconds=3.0, checkpoint=f"round-00{rnd}.npz")
    folder.event("secure-aggregation", round=2, dropped=["site-b"], survivors=["site-a"])
    folder.write_cross_site(
        {
            "global": {
                "site-a": {"dice": 0.8, "num-examples": 10.0},
                "site-b": {"dice": 0.6, "num-examples": 12.0},
            }
        },
        metric="dice",
    )
    folder.write_summary(
        RunSummary(
            status="completed",
            run_id="42",
            primary_metric="dice",
            seconds=12.0,
            final_checkpoint="round-002.npz",
        )
    )
    text = write_report(folder).read_text()
    assert text.startswith("# Run 42: tiny-seg with fedprox")
    assert "status: **completed**, 2 of 2 rounds" in text and "proximal_mu=0.1" in text
    assert "DP-SGD, one sample protected; per-sample clipping 0.3; target epsilon 8" in text
    assert "| site-a | 0.8 | 10 |" in text and "| mean | 0.7 |" in text
    assert "| 1 | 4 (0.9) | 4 (1.1) |" in text and "| 2 | 8 (0.9) | - |" in text
    assert "- site-a added more noise than the run asks (noise multiplier 0.9)" in text
    assert "site-b added" not in text
    assert "| 2 | 0.7 | 3 | site-a | without site-b |" in text
    assert "privacy.datasets.default.epsilon_max" in text and "remaining 0.5" in text
    assert "`checkpoints/round-002.npz`" in text


def test_the_report_lists_every_round_a_site_missed_and_each_resumption(tmp_path: Path) -> None:
    from medfed.core.config import RunConfig
    from medfed.core.run_report import render
    from medfed.core.runs import RunFolder

    folder = RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=4))
    for rnd in (1, 2, 3, 4):
        for site in ("site-a", "site-b"):
            if site == "site-b" and rnd in (2, 4):
                if rnd == 2:
                    folder.event(
                        "site-error",
                        round=2,
                        phase="train",
                        site="site-b",
                        node=5,
                        status="failed",
                        reason="OSError: disk full",
                    )
                continue
            folder.event("site-replied", round=rnd, phase="train", site=site, metrics={})
            folder.metrics(rnd, site, "train", {"steps": 2})
        folder.event("round-finished", round=rnd, seconds=1.0, checkpoint=f"round-00{rnd}.npz")
        if rnd == 2:
            folder.event("run-resumed", round=3, flower_run_id="99")
    text = render(folder)
    assert "## Rounds each site missed" in text
    assert "| site-b | 2 | failed: OSError: disk full |" in text
    assert "| site-b | 4 | no reply in time (or no update accepted) |" in text
    assert "| site-a |" not in text.split("## Rounds each site missed")[1]
    assert "resumed after a server restart at round 3" in text and "server run 99" in text


def test_report_html_is_one_self_contained_page(tmp_path: Path) -> None:
    import base64
    import re

    from medfed.core.config import RunConfig
    from medfed.core.run_report import write_report
    from medfed.core.runs import RunFolder

    folder = RunFolder.create(tmp_path, 9, RunConfig(task="tiny-seg", rounds=2))
    rows = [
        {"phase": "evaluate", "round": r, "site": s, "dice": 0.5 + r / 10}
        for s in ("site-a", "site-b")
        for r in (1, 2)
    ]
    for row in rows:
        folder.metrics(row["round"], row["site"], "evaluate", {"dice": row["dice"]})
    plot_metrics(rows, "dice", folder.plot_file, title="t")
    folder.write_cross_site(
        {"global": {"site-a": {"dice": 0.7}, "site-b": {"dice": 0.6}}}, metric="dice"
    )
    folder.write_summary(RunSummary(status="completed", run_id="9", primary_metric="dice"))
    write_report(folder)
    page = folder.html_report_file.read_text()
    assert (
        page.startswith("<!DOCTYPE html>") and "<title>Run 9: tiny-seg with fedavg</title>" in page
    )
    assert "<table>" in page and "<h2>" in page  # report.md's tables and sections, rendered
    (inlined,) = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(inlined) == folder.plot_file.read_bytes()
    assert '<a href="#metrics-png">metrics.png</a>' in page  # the text links to it
    # nothing fetched when it is opened: no script, no external reference
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not re.search(r'(src|href)="(?!data:|#)', page)
