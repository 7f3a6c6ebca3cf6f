"""Follow a run: its progress events from the run folder, its state from the SuperLink."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.core.errors import MedfedError
from medfed.core.run_summary import RunSummary
from medfed.core.runs import find_run
from medfed.server.control import Control, ServerUnreachable

TERMINAL = "finished"


def follow_run(
    control: Control,
    run_id: int,
    runs_dir: Path,
    *,
    on_event: Callable[[dict[str, Any]], None],
    timeout: float,
    poll: float = 0.2,
) -> RunSummary:
    """Call ``on_event`` for each new progress event until the run ends; return its summary.

    The SuperLink's status is checked too, so a ServerApp that dies before writing
    its summary still ends the wait, with the SuperLink's reason. While the server is
    down the wait goes on (``on_event`` hears a ``server-unreachable`` event once): a
    restarted server resumes the run under a new server run id, which the run folder
    names, and the wait follows it.
    """
    folder = find_run(runs_dir, run_id)
    seen = 0
    deadline = time.monotonic() + timeout
    last_status_check = 0.0
    unreachable = False
    while True:
        events = folder.read_events()
        for event in events[seen:]:
            on_event(event)
        seen = len(events)
        summary = folder.read_summary()
        if summary is not None:
            return summary
        now = time.monotonic()
        if now - last_status_check > 2.0:
            last_status_check = now
            attempt = int(folder.attempt_ids()[-1])
            try:
                runs = control.runs(attempt)
            except ServerUnreachable as exc:
                if not unreachable:
                    on_event({"event": "server-unreachable", "reason": exc.what})
                unreachable = True
                runs = []
            else:
                unreachable = False
            if runs and runs[0].status == TERMINAL:
                time.sleep(0.5)  # let the ServerApp's last writes land
                summary = folder.read_summary()
                if summary is not None:
                    return summary
                if int(folder.attempt_ids()[-1]) == attempt:  # not resumed meanwhile
                    stopped = runs[0].sub_status == "stopped"
                    return RunSummary(
                        status="stopped" if stopped else "failed",
                        run_id=str(run_id),
                        reason=runs[0].details or "the ServerApp ended without a summary",
                    )
        if now > deadline:
            raise MedfedError(
                f"Run {run_id} did not finish within {timeout:.0f} s.",
                fix=f"it keeps going on the server: `medfed status {run_id}`; "
                f"stop it with `medfed stop {run_id}`",
            )
        time.sleep(poll)
