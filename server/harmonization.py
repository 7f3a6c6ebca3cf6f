"""Harmonization's one server step: agree on the standard intensity landmarks of a run.

Before the first round (``run.harmonization = "histogram"``) the server asks every site
for the mean intensity landmarks of its training scans (a query), averages them
weighted by the sites' scan counts, and from then on sends the result with every train
and evaluate message; each site maps its scans onto it
(:mod:`medfed.tasks.harmonization`, which also says what the landmarks reveal). A site
whose rules forbid sending them (DP; secure aggregation without
``policy.share_landmarks``) refuses the query by rule, and the run ends refused before
anyone trains.

With ``run.harmonization = "histogram-public"`` the standard is the task's public one
(the intensity landmarks of its public pretraining scans, shipped with its public
weights): no site is asked, so nothing about a site's intensities leaves it, and the
mode runs under DP.

A resumed run keeps the standard its first start agreed on (from its events): asked
again, the sites could answer differently (a site's data grew, another site answers),
and the rounds before and after the crash would have trained on differently mapped
scans.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from medfed.core import wire
from medfed.core.errors import MedfedError
from medfed.core.runs import RunFolder
from medfed.core.schema import LandmarkReport, SiteInstruction
from medfed.server.refusals import RefusalPolicy
from medfed.server.site_replies import SiteAnswer
from medfed.tasks import get_task
from medfed.tasks.harmonization import federated_standard
from medfed.tasks.pretrain import load_public_standard


def agree_standard(
    grid: Grid,
    *,
    min_sites: int,
    run_entries: dict[str, Any],
    refusals: RefusalPolicy,
    folder: RunFolder,
    timeout: float,
    resumed: bool = False,
) -> tuple[float, ...]:
    """The run's standard landmarks: the sites' landmarks, averaged by their scan counts.

    ``resumed``: the standard already agreed in ``folder`` (none asked of the sites), or,
    when the run crashed before the sites had answered, asked as at a first start.
    """
    if resumed and (kept := _agreed_before(folder)):
        return kept
    sample_nodes(grid, min_sites, min_sites)  # waits until min_sites are online
    ask = ConfigRecord({**run_entries, **SiteInstruction(landmarks_query=1).entries()})
    replies = grid.send_and_receive(
        [
            Message(
                RecordDict({wire.CONFIG_KEY: ask}), dst_node_id=n, message_type=MessageType.QUERY
            )
            for n in grid.get_node_ids()
        ],
        timeout=timeout,
    )
    reports: dict[str, LandmarkReport] = {}
    for reply in replies:
        answer = SiteAnswer.of(reply)
        if not answer.ok:
            continue  # the grid recorded the refusal (its rule) or failure
        try:
            if answer.unreadable is not None:
                raise ValueError(answer.unreadable)
            reports[answer.name()] = LandmarkReport.from_metrics(answer.metrics)
        except ValueError as exc:
            folder.event(
                "warning",
                reason=f"{answer.name()}'s landmarks are unreadable ({exc}); left out",
            )
    if len(reports) < min_sites:
        why = f"{len(reports)} of the {min_sites} sites needed sent intensity landmarks"
        refusals.end_if_refused(0, "query", why)
        raise MedfedError(
            f"Harmonization 'histogram' needs landmarks from {min_sites} sites; {why}.",
            fix="see the site errors (a refusal names the site's rule), or run with "
            "--harmonization off",
        )
    standard = federated_standard(
        [r.landmarks for r in reports.values()], [r.scans for r in reports.values()]
    )
    values = tuple(round(float(v), 6) for v in standard)
    folder.event("harmonization", method="histogram", sites=sorted(reports), standard=list(values))
    return values


def public_standard(task: str, *, folder: RunFolder, resumed: bool = False) -> tuple[float, ...]:
    """The run's standard for harmonization 'histogram-public': the task's public landmarks."""
    if resumed and (kept := _agreed_before(folder)):
        return kept
    values = load_public_standard(get_task(task))
    folder.event("harmonization", method="histogram-public", sites=[], standard=list(values))
    return values


def _agreed_before(folder: RunFolder) -> tuple[float, ...]:
    """The standard this run agreed on before it was resumed (said again in its events)."""
    earlier = [e for e in folder.read_events() if e.is_("harmonization")]
    if not earlier:
        return ()
    agreed = earlier[-1]
    try:
        values = tuple(float(v) for v in agreed["standard"])
    except (KeyError, TypeError, ValueError) as exc:
        folder.event(
            "warning",
            reason=f"the standard landmarks agreed before the resume are unreadable in "
            f"{folder.events_file} ({type(exc).__name__}: {exc}); the sites are asked again",
        )
        return ()
    folder.event(
        "harmonization",
        method=agreed.get("method", "histogram"),
        sites=agreed.get("sites", []),
        standard=list(values),
        kept_at_resume=True,
    )
    return values
