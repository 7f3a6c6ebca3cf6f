"""The coordinator dashboard's routes: pages, their JSON, and checkpoint downloads.

``/`` the overview, ``/api/overview`` its poll; ``/run/ID`` one run, ``/api/run/ID``
its poll (charts data); ``/checkpoint/ID/round-NNN.npz`` and ``/report/ID`` files of a
run folder, by name only: a run id is digits and a checkpoint name matches
``round-NNN.npz``, so no request reaches a file outside the run folders. The
SuperLink is asked at most once per ``refresh_s`` however many browsers poll.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from medfed.core.errors import MedfedError
from medfed.core.web import Response
from medfed.server.dashboard import page
from medfed.server.dashboard.state import RunFolders, SitesView, sites_view
from medfed.server.federation import Federation

_CHECKPOINT = re.compile(r"round-\d{3,6}\.npz")

#: The SuperLink's answers: its nodes, and its runs' status (``status:sub_status``).
Live = Callable[[], tuple[list[dict[str, Any]], dict[str, str]]]


def control_live(fed: Federation) -> Live:
    """Ask the federation's SuperLink (Control API) for its nodes and runs."""
    from medfed.server.control import Control

    def ask() -> tuple[list[dict[str, Any]], dict[str, str]]:
        with Control(fed.config.superlink.address, fed.ca_cert, fed.credential()) as control:
            nodes = control.nodes()
            runs = {
                str(r.run_id): r.status + (f":{r.sub_status}" if r.sub_status else "")
                for r in control.runs()
            }
        return nodes, runs

    return ask


class CoordinatorDashboard:
    """The dashboard's app: ``(path, query) -> Response`` for :class:`medfed.core.web.Dashboard`."""

    def __init__(
        self,
        fed: Federation,
        *,
        live: Live | None = None,
        refresh_s: float = 1.0,
        poll_s: float = 2.0,
    ) -> None:
        self.fed = fed
        self.folders = RunFolders(fed.runs_dir)
        self._live = live or control_live(fed)
        self.refresh_s = refresh_s
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._cached: tuple[float, SitesView, dict[str, str]] | None = None

    def live(self) -> tuple[SitesView, dict[str, str]]:
        """The sites view and the SuperLink's run status, at most ``refresh_s`` old."""
        with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.refresh_s:
                return self._cached[1], self._cached[2]
            runs: dict[str, str] = {}
            answer: list[dict[str, Any]] = []
            problem: MedfedError | None = None
            try:
                answer, runs = self._live()
            except MedfedError as exc:
                problem = exc

            def nodes() -> list[dict[str, Any]]:
                if problem is not None:
                    raise problem
                return answer

            view = sites_view(self.fed.enrolled(), nodes, versions=self.folders.site_versions())
            self._cached = (time.monotonic(), view, runs)
            return view, runs

    def __call__(self, path: str, query: dict[str, str]) -> Response | None:
        """Answer one GET."""
        parts = [p for p in path.split("/") if p]
        if not parts or parts == ["api", "overview"]:
            sites, runs = self.live()
            rows = self.folders.rows(runs)
            if parts:
                return Response.json(page.overview_json(sites, rows))
            return Response(
                page.overview(self.fed.config.federation, sites, rows, poll_s=self.poll_s).encode()
            )
        if len(parts) == 2 and parts[0] == "run" or parts[:2] == ["api", "run"] and len(parts) == 3:
            folder = self.folders.folder(parts[-1])
            if folder is None:
                return None
            _, runs = self.live()
            row = self.folders.row(folder, runs)
            if parts[0] == "run":
                return Response(page.run_page(row, poll_s=self.poll_s).encode())
            return Response.json(
                {
                    "updated": page.now_utc(),
                    "html": {"head": page.run_head(row)},
                    "details": self.folders.details(folder),
                }
            )
        if len(parts) == 3 and parts[0] == "checkpoint" and _CHECKPOINT.fullmatch(parts[2]):
            folder = self.folders.folder(parts[1])
            file = folder.path / "checkpoints" / parts[2] if folder else None
            if file is None or not file.is_file():
                return None
            return Response(
                file.read_bytes(),
                "application/octet-stream",
                headers={
                    "Content-Disposition": f'attachment; filename="run-{parts[1]}-{parts[2]}"'
                },
            )
        if len(parts) == 2 and parts[0] == "report":
            folder = self.folders.folder(parts[1])
            if folder is None or not folder.html_report_file.is_file():
                return None
            return Response(folder.html_report_file.read_bytes())
        return None
