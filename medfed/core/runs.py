"""The run folder: checkpoints, per-site metrics, progress events and the summary.

Written by the ServerApp as the run goes; read by `medfed run/runs/status`.
Every file is appended or written atomically, so a crash loses nothing already
written.

Layout of ``runs/<run-id>/``::

    run.json           the validated run configuration and start time
    events.jsonl       progress: round started, site replied/refused, round done, end
    metrics.jsonl      one line per round, per site and phase (train/evaluate), plus "global"
    checkpoints/round-NNN.npz   the global model after each round (the last
                       ``keep_checkpoints`` rounds where the run sets it)
    summary.json       final status, timings, last metrics (written at the end)
    cross_site.json    the global model evaluated on every site's held-out split
    metrics.png        per-site primary metric per round
    report.md          the run in one page: protection, scores, epsilon per site per round
    report.html        the same, with its plot inline: one self-contained file to mail
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.files import atomic_savez, atomic_write
from medfed.core.run_summary import EVENT_KINDS, EventKind, RunEvent, RunSummary


def now_iso() -> str:
    """UTC time stamp."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


#: A checkpoint's file name (atomic writes' temporary files start with a dot).
_CHECKPOINT_NAME = re.compile(r"round-([0-9]+)\.npz")


@dataclass(frozen=True)
class RunFolder:
    """One run's folder."""

    path: Path

    @classmethod
    def create(cls, runs_dir: Path, run_id: int | str, config: RunConfig) -> RunFolder:
        """Create the folder of a new run and record its configuration."""
        folder = cls(Path(runs_dir) / str(run_id))
        folder.path.mkdir(parents=True, exist_ok=True)
        info = {"run_id": str(run_id), "started": now_iso(), "config": config.model_dump()}
        atomic_write(folder.run_file, json.dumps(info, indent=2).encode())
        return folder

    @classmethod
    def reopen(cls, runs_dir: Path, run_id: str, attempt_id: int | str) -> RunFolder:
        """The folder of run ``run_id``, which resumes as the server's run ``attempt_id``.

        ``attempt_id`` becomes an alias (``.aliases/ATTEMPT``) so that the coordinator's
        commands find the run under either id.
        """
        folder = cls(Path(runs_dir) / str(run_id))
        if not folder.run_file.is_file():
            raise MedfedError(
                f"Run {run_id} cannot be resumed: its folder is gone.",
                where=str(folder.path),
                fix="restore the run folder from backup, or start a new run",
            )
        atomic_write(aliases_dir(runs_dir) / str(attempt_id), str(run_id).encode())
        return folder

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run: one ServerApp at a time works in a run folder."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+b") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MedfedError(
                    f"Run {self.path.name} is already running on this server.",
                    where=str(self.path),
                    fix="wait for it or stop it (`medfed stop`)",
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def is_running(self) -> bool:
        """Whether a ServerApp holds this run now (see :meth:`lock`)."""
        path = self.path / ".lock"
        if not path.exists():
            return False
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    def resumptions(self) -> list[dict[str, Any]]:
        """Every time the run was resumed: the round it went on from, and when."""
        return [
            {"round": e.round, "flower_run_id": e.get("flower_run_id"), "time": e.time}
            for e in self.read_events()
            if e.is_("run-resumed")
        ]

    def attempt_ids(self) -> list[str]:
        """The server's run ids of this run: the first, then each resumption's."""
        return [self.path.name] + [
            str(e["flower_run_id"]) for e in self.read_events() if e.is_("run-resume-submitted")
        ]

    @property
    def run_file(self) -> Path:
        """run.json."""
        return self.path / "run.json"

    @property
    def events_file(self) -> Path:
        """events.jsonl."""
        return self.path / "events.jsonl"

    @property
    def metrics_file(self) -> Path:
        """metrics.jsonl."""
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        """summary.json."""
        return self.path / "summary.json"

    @property
    def plot_file(self) -> Path:
        """metrics.png."""
        return self.path / "metrics.png"

    @property
    def report_file(self) -> Path:
        """report.md (:mod:`medfed.core.run_report`)."""
        return self.path / "report.md"

    @property
    def html_report_file(self) -> Path:
        """report.html: report.md with its plot inline, one self-contained file."""
        return self.path / "report.html"

    def checkpoint_file(self, server_round: int) -> Path:
        """checkpoints/round-NNN.npz."""
        return self.path / "checkpoints" / f"round-{server_round:03d}.npz"

    def event(self, kind: EventKind, **fields: Any) -> None:
        """Append a progress event (``kind``: one of :data:`~medfed.core.run_summary.EventKind`)."""
        if kind not in EVENT_KINDS:  # a bug: readers would not know it
            raise ValueError(f"unknown run event kind {kind!r}; add it to run_summary.EventKind")
        append_jsonl(self.events_file, {"time": now_iso(), "event": kind, **fields})

    def metrics(self, server_round: int, site: str, phase: str, values: dict[str, Any]) -> None:
        """Append one metrics line (``site`` is a site name or "global")."""
        append_jsonl(
            self.metrics_file, {"round": server_round, "site": site, "phase": phase, **values}
        )

    def save_checkpoint(self, server_round: int, weights: dict[str, np.ndarray]) -> Path:
        """Write the global model of ``server_round`` atomically (numpy .npz, no pickle)."""
        return atomic_savez(self.checkpoint_file(server_round), **weights)

    def saved_rounds(self) -> list[int]:
        """The rounds whose checkpoint is in the folder, in order."""
        found = (
            _CHECKPOINT_NAME.fullmatch(p.name) for p in (self.path / "checkpoints").glob("round-*")
        )
        return sorted(int(m[1]) for m in found if m)

    def prune_checkpoints(self, keep: int) -> list[Path]:
        """Delete all but the last ``keep`` rounds' checkpoints (0: keep all); returns them.

        Called after a round's checkpoint and resume state are written, so the newest
        checkpoint, the one a resumed run starts from, is always kept.
        """
        if keep <= 0:
            return []
        gone = [self.checkpoint_file(r) for r in self.saved_rounds()[:-keep]]
        for path in gone:
            path.unlink(missing_ok=True)
        return gone

    @property
    def cross_site_file(self) -> Path:
        """cross_site.json: every model evaluated on every site's held-out split."""
        return self.path / "cross_site.json"

    def write_cross_site(
        self, matrix: dict[str, dict[str, dict[str, float]]], *, metric: str, note: str = ""
    ) -> None:
        """Write the cross-site matrix (model -> site -> metrics), with what it means."""
        body: dict[str, Any] = {"metric": metric, "matrix": matrix}
        if note:
            body["note"] = note
        atomic_write(self.cross_site_file, json.dumps(body, indent=2).encode())

    def write_summary(self, summary: RunSummary) -> None:
        """Write summary.json atomically."""
        atomic_write(self.summary_file, summary.to_json().encode())

    def read_run(self) -> dict[str, Any]:
        """run.json as a dict."""
        return json.loads(self.run_file.read_text(encoding="utf-8"))

    def read_summary(self) -> RunSummary | None:
        """summary.json, or None while the run is going."""
        if not self.summary_file.exists():
            return None
        text = self.summary_file.read_text(encoding="utf-8")
        return RunSummary.from_json(text, where=str(self.summary_file))

    def read_events(self) -> list[RunEvent]:
        """All events so far, typed (a line that is not an event is skipped)."""
        return [e for e in map(RunEvent.parse, read_jsonl(self.events_file)) if e is not None]

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics lines so far."""
        return read_jsonl(self.metrics_file)


def aliases_dir(runs_dir: Path) -> Path:
    """Where a resumed run's later server run ids point to its folder."""
    return Path(runs_dir) / ".aliases"


def run_id_of(runs_dir: Path, server_run_id: int | str) -> str:
    """The run a server run id belongs to: itself, or the run it resumed."""
    alias = aliases_dir(runs_dir) / str(server_run_id)
    if alias.is_file():
        return alias.read_text(encoding="utf-8").strip()
    return str(server_run_id)


def find_run(runs_dir: Path, server_run_id: int | str) -> RunFolder:
    """The folder of the run ``server_run_id`` is (or resumed)."""
    return RunFolder(Path(runs_dir) / run_id_of(runs_dir, server_run_id))


def list_runs(runs_dir: Path) -> Iterator[RunFolder]:
    """Run folders under ``runs_dir``, newest first."""
    if not Path(runs_dir).exists():
        return iter(())
    folders = [RunFolder(p) for p in Path(runs_dir).iterdir() if (p / "run.json").exists()]
    return iter(sorted(folders, key=lambda f: f.run_file.stat().st_mtime, reverse=True))
