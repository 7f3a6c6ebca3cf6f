"""The run folder's typed summary and closed set of event kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.run_summary import (
    EVENT_KINDS,
    Adaptation,
    Protection,
    Resumption,
    RunSummary,
    Simulation,
    SiteRefusal,
)
from medfed.core.runs import RunFolder

FULL = RunSummary(
    status="completed",
    run_id="42",
    task="tiny-seg",
    strategy="fedprox",
    rounds=2,
    protection=Protection(transport="tls", secure_aggregation="default", privacy="sample"),
    adaptation=Adaptation(hook="fedbn", site_local_parameters=["norm.weight"]),
    seconds=12.5,
    round_seconds={1: 6.0, 2: 6.5},
    resumed=[Resumption(round=2, flower_run_id="99", time="2026-12-05T10:00:00")],
    sites=["site-a", "site-b"],
    evaluate_metrics={1: {"dice": 0.5}, 2: {"dice": 0.75, "loss": 0.3}},
    primary_metric="dice",
    final_checkpoint="round-002.npz",
    engine="simulation",
    simulation=Simulation(
        engine="processes", workers=2, sites=8, site_folders="/x", keep_warm=3, source="synth"
    ),
)
REFUSED = RunSummary(
    status="refused",
    run_id="7",
    rounds=3,
    rounds_finished=1,
    reason="Round 2 (train): ...",
    refusals={"site-a": SiteRefusal(rule="privacy.datasets.brain.epsilon_max", reason="spent")},
    final_checkpoint="round-001.npz",
)


@pytest.mark.parametrize("summary", [FULL, REFUSED, RunSummary(status="failed", run_id="1")])
def test_a_summary_survives_its_file(tmp_path: Path, summary: RunSummary) -> None:
    folder = RunFolder.create(tmp_path, int(summary.run_id), RunConfig(task="tiny-seg"))
    folder.write_summary(summary)
    assert folder.read_summary() == summary
    on_disk = json.loads(folder.summary_file.read_text())
    assert on_disk["status"] == summary.status
    assert ("reason" in on_disk) == (summary.reason is not None)  # unset parts left out


def test_the_final_metrics_are_the_last_rounds() -> None:
    assert FULL.completed and FULL.final_metrics() == {"dice": 0.75, "loss": 0.3}
    assert not REFUSED.completed and REFUSED.final_metrics() == {}


def test_a_writer_cannot_add_a_key_no_reader_knows() -> None:
    with pytest.raises(ValueError, match="round_secs"):
        RunSummary(status="completed", run_id="1", round_secs={})  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="status"):
        RunSummary(status="done", run_id="1")  # type: ignore[arg-type]


def test_a_damaged_summary_says_where_and_what(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, 5, RunConfig(task="tiny-seg"))
    folder.summary_file.write_text(
        json.dumps({"status": "completed", "run_id": "5", "rounds": "x"})
    )
    with pytest.raises(MedfedError) as caught:
        folder.read_summary()
    text = str(caught.value)
    assert "rounds" in text and str(folder.summary_file) in text and "events.jsonl" in text


def test_only_known_event_kinds_are_written(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, 6, RunConfig(task="tiny-seg"))
    folder.event("round-finished", round=1)
    with pytest.raises(ValueError, match="round-done"):
        folder.event("round-done", round=1)  # type: ignore[arg-type]
    assert [e["event"] for e in folder.read_events()] == ["round-finished"]


def test_every_event_kind_the_code_writes_is_declared() -> None:
    """Each literal ``.event("kind", ...)`` in the tree is one of EventKind's kinds."""
    import re

    root = Path(__file__).resolve().parents[1]
    written: set[str] = set()
    for folder in ("server", "client", "medfed"):
        for path in (root / folder).rglob("*.py"):
            written |= set(re.findall(r"\.event\(\s*\"([a-z-]+)\"", path.read_text()))
    assert len(written) >= 15, written
    assert written <= EVENT_KINDS, sorted(written - EVENT_KINDS)


def test_events_read_back_typed_and_a_line_that_is_not_one_is_skipped(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg"))
    folder.event("site-error", round=2, site="site-b", status="refused", rule="privacy.budget")
    with folder.events_file.open("a", encoding="utf-8") as fh:  # an older or damaged line
        fh.write(json.dumps({"event": "round-done", "round": 3}) + "\n")
        fh.write(json.dumps({"event": "round-finished", "round": "three"}) + "\n")
    folder.event("round-finished", round=2, seconds=1.5)
    events = folder.read_events()
    assert [(e.event, e.round) for e in events] == [("site-error", 2), ("round-finished", 2)]
    error = events[0]
    assert error.is_("site-error") and not error.is_("round-finished")
    assert error.time[:4].isdigit()
    assert error["rule"] == "privacy.budget" and error.get("seconds") is None
    assert "site" in error and "seconds" not in error
    with pytest.raises(KeyError):
        error["seconds"]
    with pytest.raises(ValueError, match="round-done"):
        error.is_("round-done")  # type: ignore[arg-type]


def test_a_run_whose_every_round_was_lost_is_told_apart_from_one_that_trained() -> None:
    from medfed.core.run_summary import RunEvent, no_model_reason, rounds_without_model

    def events(*lines: dict) -> list[RunEvent]:
        return [e for line in lines if (e := RunEvent.parse(line)) is not None]

    lost = {"event": "round-lost", "round": 1, "reason": "round 1: 0 survivors\n  where: x"}
    gave, none = (
        {"event": "round-finished", "round": r, "checkpoint": f"round-00{r}.npz", **extra}
        for r, extra in ((2, {}), (1, {"model_unchanged": True}))
    )
    # round 1 lost, round 2 gave a model, round 3 never finished
    assert rounds_without_model(events(lost, none, gave), 3) == [1, 3]
    # a resumed run: round 1 lost in one attempt, trained in the next
    again = {**none, "model_unchanged": False}
    assert rounds_without_model(events(none, again), 1) == []
    reason = no_model_reason(events(lost, none), 1)
    assert "all 1 round(s) were lost" in reason and "round 1: 0 survivors" in reason
    assert "where" not in reason  # the cause's first line only
