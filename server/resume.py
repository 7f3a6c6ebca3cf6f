"""After a server crash: resume every unfinished run from its last completed round.

`medfed server start` calls :func:`resume_unfinished` once its SuperLink serves. A
run folder without ``summary.json`` that no ServerApp holds (:meth:`RunFolder.lock`)
belongs to a run the server lost. It is submitted again with ``resume_of`` set to
its id: the new ServerApp writes into the same folder, restores the global model
and the strategy's state saved after the last completed round
(:mod:`medfed.server.run_state`) and goes on from the next round, with fresh
secure-aggregation keys. Sites charge their ledgers under the run's first id, so a
round they already trained is not charged again (:mod:`medfed.client.privacy_guard`).

A run that cannot be resumed (its configuration no longer validates, the task or
strategy is gone, it was stopped on purpose) ends with status ``failed``, a summary
and the reason, so nothing stays "running" forever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.run_summary import RunSummary
from medfed.core.runs import RunFolder, list_runs
from medfed.server.control import Control

log = logging.getLogger("medfed.server")


@dataclass(frozen=True)
class ResumeOutcome:
    """What happened to one unfinished run at server start."""

    run_id: str
    resumed_as: int | None  # the server's run id of the resumed run, None if it ended
    reason: str = ""


#: How long a run folder may still be held by the ServerApp of a server that went away
#: (it notices its parent's end within a second or two) before it counts as running.
RELEASE_WAIT_S = 20.0


def unfinished_runs(runs_dir: Path, *, release_wait: float = RELEASE_WAIT_S) -> list[RunFolder]:
    """Run folders with no summary that no ServerApp holds, oldest first."""
    out = []
    deadline = time.monotonic() + release_wait
    for folder in reversed(list(list_runs(runs_dir))):
        if folder.read_summary() is not None:
            continue
        while folder.is_running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not folder.is_running() and folder.read_summary() is None:
            out.append(folder)
    return out


def end_unresumable(
    folder: RunFolder, reason: str, *, status: Literal["failed", "stopped"] = "failed"
) -> None:
    """Close a run that will not go on: a summary and an event with the reason."""
    done = sorted(
        {e.round for e in folder.read_events() if e.is_("round-finished") and e.round is not None}
    )
    folder.event("run-stopped" if status == "stopped" else "run-failed", reason=reason)
    folder.write_summary(
        RunSummary(
            status=status,
            run_id=folder.path.name,
            reason=reason,
            rounds_finished=len(done),
            final_checkpoint=folder.checkpoint_file(done[-1]).name if done else None,
        )
    )


def _stopped_on_purpose(control: Control, folder: RunFolder) -> bool:
    """Whether the SuperLink says the coordinator stopped the run's last attempt."""
    try:
        infos = control.runs(int(folder.attempt_ids()[-1]))
    except (MedfedError, ValueError):
        return False
    return bool(infos) and infos[0].status == "finished" and infos[0].sub_status == "stopped"


def resume_unfinished(
    control: Control, runs_dir: Path, *, resume: bool = True, release_wait: float = RELEASE_WAIT_S
) -> list[ResumeOutcome]:
    """Resubmit (or, with ``resume`` off, close) every run the server lost."""
    outcomes = []
    for folder in unfinished_runs(runs_dir, release_wait=release_wait):
        run_id = folder.path.name
        try:
            config = RunConfig.model_validate(folder.read_run()["config"])
        except (MedfedError, ValueError, KeyError, OSError) as exc:
            reason = (
                f"the server stopped during the run, whose configuration no longer "
                f"reads back ({type(exc).__name__}: {exc})"
            )
            end_unresumable(folder, reason)
            outcomes.append(ResumeOutcome(run_id, None, reason))
            continue
        if _stopped_on_purpose(control, folder):
            reason = "the run was stopped by the coordinator"
            end_unresumable(folder, reason, status="stopped")
            outcomes.append(ResumeOutcome(run_id, None, reason))
            continue
        if not resume:
            reason = "the server stopped during the run and was started with --no-resume"
            end_unresumable(folder, reason)
            outcomes.append(ResumeOutcome(run_id, None, reason))
            continue
        lost = folder.attempt_ids()
        try:
            new_id = control.submit(config.model_copy(update={"resume_of": run_id}))
        except MedfedError as exc:
            reason = f"the server stopped during the run and could not resubmit it: {exc}"
            end_unresumable(folder, reason)
            outcomes.append(ResumeOutcome(run_id, None, reason))
            continue
        RunFolder.reopen(runs_dir, run_id, new_id)
        folder.event("run-resume-submitted", flower_run_id=str(new_id))
        for attempt in lost:  # make the lost attempts terminal at once (after the new one
            try:  # is named, so a coordinator following the run moves on to it)
                control.stop(int(attempt))
            except (MedfedError, ValueError):
                pass  # already finished, or unknown to this SuperLink
        log.warning(
            "resumed run %s (the server stopped during it) as server run %s", run_id, new_id
        )
        outcomes.append(ResumeOutcome(run_id, new_id))
    return outcomes
