"""Sites' refusals as the server reads them: named per site and rule, and ending a run
that can no longer train instead of reporting an untrained model as completed."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict
from rich.console import Console

from medfed.cli.progress import ProgressView
from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.runs import RunFolder
from medfed.core.schema import SiteError
from medfed.server.recording_grid import RecordingGrid
from medfed.server.refusals import RefusalPolicy, SitesRefused

BUDGET = SiteError(
    "site-a",
    "refused",
    "privacy.datasets.default.epsilon_max",
    "Privacy budget exceeded for dataset 'default': spent 2 + this round 1.5 > epsilon_max 3 "
    "(remaining 1).",
)


def test_a_site_error_reads_back_from_the_executors_text() -> None:
    # The ClientApp executor puts the exception type in front of the site's text.
    assert SiteError.parse(f"RuntimeError: {BUDGET.text()}") == BUDGET
    failed = SiteError("site-b", "failed", "", "ValueError: no labels\nsecond line")
    assert SiteError.parse("RuntimeError: " + failed.text()) == failed
    assert SiteError.parse("ConnectionError: the SuperNode went away") is None
    # a failure that quotes another's text is still not a refusal
    quoted = SiteError("site-x", "refused", "r", "y").text()
    assert SiteError.parse(f"ValueError: bad label: {quoted}") is None
    assert SiteError.parse(BUDGET.text()[:-2]) is None  # torn: not a record


class FakeGrid:
    """Answers every message with the error (or success) given for its node."""

    def __init__(self, answers: dict[int, str | None]) -> None:
        self.answers = answers
        self._sent: dict[str, int] = {}

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for i, m in enumerate(messages):
            ids.append(f"m{i}")
            self._sent[f"m{i}"] = m.metadata.dst_node_id
        return ids

    def pull_messages(self, ids: set[str]) -> list[Any]:
        return [self._reply(mid, self._sent[mid]) for mid in sorted(ids)]

    def _reply(self, mid: str, node: int) -> Any:
        text = self.answers[node]
        meta = SimpleNamespace(src_node_id=node, reply_to_message_id=mid)
        if text is None:  # a result
            content = RecordDict(
                {
                    wire.SITE_RECORD_KEY: ConfigRecord({"name": f"site-{node}"}),
                    wire.METRICS_KEY: ConfigRecord({}),
                }
            )
            return SimpleNamespace(metadata=meta, has_error=lambda: False, content=content)
        return SimpleNamespace(
            metadata=meta, has_error=lambda: True, error=SimpleNamespace(reason=text)
        )


def _train(nodes: list[int], rnd: int = 1) -> list[Any]:
    """Training messages as the strategy hands them to the grid (only what it reads)."""
    return [
        SimpleNamespace(
            metadata=SimpleNamespace(dst_node_id=n, message_type=MessageType.TRAIN),
            content={wire.CONFIG_KEY: {wire.SERVER_ROUND_KEY: rnd}},
        )
        for n in nodes
    ]


def _folder(tmp_path: Path) -> RunFolder:
    return RunFolder.create(tmp_path, 7, RunConfig(task="tiny-seg", rounds=3))


def test_a_round_every_site_refuses_ends_the_run_with_each_sites_rule(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    other = SiteError(
        "site-b",
        "refused",
        "privacy.datasets.default.min_noise_multiplier",
        "noise 0.3 is below 0.5",
    )
    grid = RecordingGrid(
        FakeGrid({1: "RuntimeError: " + BUDGET.text(), 2: "RuntimeError: " + other.text()}), folder
    )
    with pytest.raises(SitesRefused) as caught:
        grid.send_and_receive(_train([1, 2]))
    assert set(caught.value.refusals) == {"site-a", "site-b"} and caught.value.round == 1
    text = str(caught.value)
    assert "site-a [privacy.datasets.default.epsilon_max]" in text and "remaining 1" in text
    assert "min_noise_multiplier" in text and "fix:" in text
    errors = [e for e in folder.read_events() if e["event"] == "site-error"]
    assert {(e["site"], e["status"], e["rule"]) for e in errors} == {
        ("site-a", "refused", BUDGET.rule),
        ("site-b", "refused", other.rule),
    }


def test_a_failure_or_a_training_site_keeps_the_run_going(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    crash = SiteError("site-b", "failed", "", "OSError: disk full").text()
    # one refusal and one crash: the crash may not repeat, so no end
    grid = RecordingGrid(FakeGrid({1: BUDGET.text(), 2: crash}), folder)
    assert len(grid.send_and_receive(_train([1, 2]))) == 2
    # one refusal and one site that trained: the round has a result
    refusals = RefusalPolicy()
    grid = RecordingGrid(FakeGrid({1: BUDGET.text(), 2: None}), folder, refusals=refusals)
    assert len(grid.send_and_receive(_train([1, 2], rnd=2))) == 2
    # a shortfall explained by refusals alone (secure aggregation's threshold) does end it
    with pytest.raises(SitesRefused, match="too few"):
        refusals.end_if_refused(2, "train", "too few sites trained")


def test_the_progress_view_names_the_site_and_rule_of_a_refusal(tmp_path: Path) -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200, color_system=None), rounds=3)
    view(
        {
            "event": "site-error",
            "round": 1,
            "phase": "train",
            "node": 9,
            "site": "site-a",
            "status": "refused",
            "rule": BUDGET.rule,
            "reason": BUDGET.reason,
        }
    )
    view({"event": "round-lost", "round": 1, "reason": "0 survivors [threshold 1]"})
    view(
        {
            "event": "secure-aggregation",
            "round": 2,
            "dropped": ["site-c"],
            "survivors": ["site-a", "site-b"],
        }
    )
    view(
        {
            "event": "site-error",
            "round": 1,
            "phase": "train",
            "node": 12,
            "reason": "RuntimeError: SuperNode gone",
        }
    )
    printed = out.getvalue()
    assert f"site-a           refused ({BUDGET.rule}): Privacy budget exceeded" in printed
    assert "round lost (round 1): 0 survivors [threshold 1]" in printed  # brackets kept
    assert "node 12          failed: RuntimeError: SuperNode gone" in printed
    assert "secure aggregation without site-c: the sum of site-a, site-b (round 2)" in printed


def test_a_run_ends_before_a_round_the_sites_budgets_cannot_carry(tmp_path: Path) -> None:
    """Forecasts from the join: past site-a's 2 rounds, one site is left, and secure
    aggregation needs 2; the run ends before round 3, so site-b does not spend on it."""
    from medfed.core.secagg import SecAggConfig
    from medfed.server.secure_aggregation import SecureAggregation

    folder = _folder(tmp_path)
    secure = SecureAggregation(
        None,
        grid=RecordingGrid(FakeGrid({}), folder),
        folder=folder,  # type: ignore[arg-type]
        run_id="7",
        config=SecAggConfig(mode="default"),
        size=1,
        round_timeout=1.0,
        run_entries={wire.RUN_CONFIG_KEY: "{}"},
        refusals=RefusalPolicy(),
    )
    secure.aggregator = SimpleNamespace(threshold=1)  # type: ignore[assignment]
    secure.covers = {"site-a": 2}
    secure._end_if_budgets_run_out(2, ["site-a", "site-b"])  # covered: the round goes ahead
    # a third site keeps the round possible: site-a refuses it itself, as before
    secure._end_if_budgets_run_out(3, ["site-a", "site-b", "site-c"])
    with pytest.raises(SitesRefused) as caught:
        secure._end_if_budgets_run_out(3, ["site-a", "site-b"])
    assert caught.value.round == 3 and set(caught.value.refusals) == {"site-a"}
    assert "covers 2 of the run's rounds" in caught.value.refusals["site-a"].reason


def test_the_progress_view_shows_a_joined_sites_budget_forecast() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200, color_system=None), rounds=3)
    view(
        {
            "event": "site-replied",
            "round": 0,
            "phase": "query",
            "site": "site-a",
            "metrics": {wire.BUDGET_ROUNDS_KEY: 2},
        }
    )
    view({"event": "site-replied", "round": 0, "phase": "query", "site": "site-b", "metrics": {}})
    view(
        {
            "event": "site-replied",
            "round": 0,
            "phase": "query",
            "site": "site-c",
            "metrics": {wire.FITTED_NOISE_KEY: 2.2412},
        }
    )
    view({"event": "run-refused", "round": 0})
    printed = out.getvalue()
    assert (
        "site-a           joined, but its privacy budget covers only 2 of the 3 rounds" in printed
    )
    assert "site-b           ok" in printed
    assert (
        "site-c           joined, but it adds more noise than the run asks (noise "
        "multiplier 2.24) to fit its remaining privacy budget"
    ) in printed
    assert "run ended: the sites refused (at set-up, before any site trained)" in printed


def test_an_error_the_superlink_writes_for_a_site_is_recorded_under_that_site(
    tmp_path: Path,
) -> None:
    """A crashed site's "Node Unavailable" comes from the SuperLink (its own node id)."""

    class SuperLinkAnswers(FakeGrid):
        def _reply(self, mid: str, node: int) -> Any:
            reply = super()._reply(mid, node)
            if self.answers[node] is not None:
                reply.metadata.src_node_id = 1  # the SuperLink, not the site
            return reply

    folder = _folder(tmp_path)
    grid = RecordingGrid(SuperLinkAnswers({7: None, 8: None}), folder)
    grid.send_and_receive(_train([7, 8]))  # both reply: node 7 is site-7
    grid._grid.answers[7] = "Error: Node Unavailable - no heartbeat"  # type: ignore[attr-defined]
    grid.send_and_receive(_train([7, 8], rnd=2))
    errors = [e for e in folder.read_events() if e["event"] == "site-error"]
    assert [(e["site"], e["node"], e["round"]) for e in errors] == [("site-7", 7, 2)]


def test_a_lost_round_is_not_reported_as_done(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    grid = RecordingGrid(FakeGrid({}), folder)
    grid.finish_round(1, checkpoint="round-001.npz")
    grid.finish_round(2, checkpoint="round-002.npz", unchanged=True)
    finished = [e for e in folder.read_events() if e["event"] == "round-finished"]
    assert [e.get("model_unchanged", False) for e in finished] == [False, True]
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=200, color_system=None), rounds=3)
    for event in finished:
        view(event)
    printed = out.getvalue()
    assert "round 1 done" in printed
    assert "round 2 gave no new model" in printed and "round 2 done" not in printed


def test_a_site_unavailable_at_the_join_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SuperNode restarting when a run starts (or resumes) is not left out of it."""
    from flwr.common.constant import ErrorCode
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)  # as in a ServerApp
    from medfed.core.secagg import SecAggConfig
    from medfed.server.secure_aggregation import SecureAggregation

    class Restarting(FakeGrid):
        """Node 8 misses its heartbeats at the first join, then answers; node 9 is gone."""

        def __init__(self) -> None:
            super().__init__({7: None, 8: None, 9: None})
            self.asked: list[int] = []

        def get_node_ids(self) -> list[int]:
            return [7, 8, 9]

        def _reply(self, mid: str, node: int) -> Any:
            self.asked.append(node)
            if node == 9 or (node == 8 and self.asked.count(8) == 1):
                return SimpleNamespace(
                    metadata=SimpleNamespace(src_node_id=1, reply_to_message_id=mid),
                    has_error=lambda: True,
                    error=SimpleNamespace(
                        code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"
                    ),
                )
            return super()._reply(mid, node)

    folder = _folder(tmp_path)
    fake = Restarting()
    secure = SecureAggregation(
        None,
        grid=RecordingGrid(fake, folder),
        folder=folder,  # type: ignore[arg-type]
        run_id="7",
        config=SecAggConfig(mode="default"),
        size=1,
        round_timeout=2.5,
        run_entries={wire.RUN_CONFIG_KEY: "{}"},
        refusals=RefusalPolicy(),
    )
    replies = secure._join_replies()
    assert sorted(r.metadata.src_node_id for r in replies) == [7, 8]
    assert fake.asked.count(7) == 1  # a site that answered is not asked again
    assert fake.asked.count(9) >= 2  # asked until the retry window (the round timeout) ends
