"""What a run folder says about its run: the typed summary and the closed set of event kinds.

``summary.json`` is written once, when a run ends (by the ServerApp, the resumer or
the simulation), and read by ``medfed run``/``simulate``/``demo``/``compare``, the
report and the benchmarks. :class:`RunSummary` is that file's one schema: a writer
cannot add a key a reader does not know, and a reader gets attributes, not guesses.

``events.jsonl`` holds progress events; :data:`EventKind` lists every kind a run
writes (:meth:`medfed.core.runs.RunFolder.event` refuses another), and
:class:`RunEvent` is how a line is read back: its kind, time and round typed, the
fields its kind carries beside them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("medfed.runs")

#: How a run ended: it trained every round, the sites' refusals ended it, it broke,
#: or the coordinator (or a Ctrl-C of a simulation) stopped it.
RunStatus = Literal["completed", "refused", "failed", "stopped"]

#: Every kind of progress event a run writes to events.jsonl.
EventKind = Literal[
    "run-started",  # the ServerApp took the run (its configuration)
    "run-resumed",  # a restarted server went on from a round
    "run-resume-submitted",  # the server submitted a resumption of a crashed run
    "initial-model",  # where the initial weights came from
    "adaptation",  # site-local parameters of the domain-adaptation hook
    "harmonization",  # the standard intensity landmarks the sites agreed on
    "warning",  # something the coordinator should know (no effect on the run)
    "secure-aggregation-ready",  # the sites' keys are in; the roster is fixed
    "sites-missing",  # fewer sites than a round needs are online
    "round-sent",  # a round's messages went out (models_named: train messages without
    # their model, which the site kept from its evaluation)
    "model-resent",  # sites that no longer held the model they were named got it again
    "site-replied",  # a site's reply (its metrics) arrived
    "site-version",  # the medfed version a site reports (first seen in the run, or changed)
    "site-error",  # a site refused (with its rule) or failed
    "update-rejected",  # a masked update that could not be added (and why)
    "reveal-rejected",  # a site's unmasking share that did not verify
    "secure-aggregation",  # a round's survivors and dropouts
    "round-lost",  # a round ended without a new model
    "round-finished",  # a round's checkpoint is written
    "run-finished",  # completed
    "run-refused",  # the sites' refusals ended the run
    "run-failed",  # an error ended the run
    "run-stopped",  # the coordinator stopped it
    "run-interrupted",  # the ServerApp was stopped; a restarted server resumes it
]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))


class RunEvent(BaseModel):
    """One line of events.jsonl: its kind, when, the round; the fields its kind carries.

    The fields beyond ``event``, ``time`` and ``round`` depend on the kind (a
    site-error's ``site``, ``status``, ``rule`` and ``reason``; a secure-aggregation
    event's ``survivors``); :meth:`get` and ``event["name"]`` read them by name.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    event: EventKind
    time: str = ""
    round: int | None = None

    @classmethod
    def parse(cls, line: dict[str, Any]) -> RunEvent | None:
        """The event of one decoded line; None for a line that is not one (logged)."""
        try:
            return cls.model_validate(line)
        except ValidationError as exc:
            log.warning("an events.jsonl line that is not a run event is skipped: %s", exc)
            return None

    def is_(self, kind: EventKind) -> bool:
        """Whether this event is of ``kind`` (a kind that is not declared is a bug)."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown run event kind {kind!r}")
        return self.event == kind

    def get(self, name: str, default: Any = None) -> Any:
        """Field ``name`` (common or of this kind), else ``default``."""
        return self[name] if name in self else default

    def __getitem__(self, name: str) -> Any:
        if name in type(self).model_fields and name in self.model_fields_set | {"event"}:
            return getattr(self, name)
        extra = self.model_extra or {}
        if name in extra:
            return extra[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.model_fields_set or name in (self.model_extra or {})


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Protection(_Part):
    """How the run's updates were protected."""

    transport: str
    secure_aggregation: str
    privacy: str


class Adaptation(_Part):
    """The domain-adaptation hook and the parameters that stayed at the sites."""

    hook: str
    site_local_parameters: list[str] = []


class Resumption(_Part):
    """One resumption of the run after a server crash."""

    round: int | None = None
    flower_run_id: str | None = None
    time: str | None = None


class SiteRefusal(_Part):
    """A site's refusal: the rule of its site.toml and its reason."""

    rule: str
    reason: str


class Simulation(BaseModel):
    """How a simulated run's sites ran (``describe`` of the caller may add its own keys)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    engine: str  # "in-process" or "processes"
    workers: int
    sites: int
    site_folders: str
    #: How many simulated sites keep their model and data in memory between rounds.
    keep_warm: int = 0


class RunSummary(_Part):
    """summary.json: how the run ended, and what it left."""

    status: RunStatus
    run_id: str
    #: Why a run that did not complete ended (the refusals, the error, the stop).
    reason: str | None = None
    task: str | None = None
    strategy: str | None = None
    rounds: int | None = None
    #: Rounds with a checkpoint, for a run that did not complete.
    rounds_finished: int | None = None
    #: Rounds that ended without a new global model (every update lost or failed).
    rounds_lost: list[int] | None = None
    refusals: dict[str, SiteRefusal] | None = None
    #: The last round's checkpoint (a file name under checkpoints/), if any round finished.
    final_checkpoint: str | None = None
    seconds: float | None = None
    protection: Protection | None = None
    adaptation: Adaptation | None = None
    round_seconds: dict[int, float] = {}
    resumed: list[Resumption] | None = None
    sites: list[str] = []
    #: The global model's evaluation per round, averaged over the sites.
    evaluate_metrics: dict[int, dict[str, float]] = {}
    primary_metric: str | None = None
    engine: Literal["deployment", "simulation"] = "deployment"
    simulation: Simulation | None = None

    @property
    def completed(self) -> bool:
        """Whether the run trained every round."""
        return self.status == "completed"

    def final_metrics(self) -> dict[str, float]:
        """The global model's evaluation after the last round (empty if there is none)."""
        return self.evaluate_metrics.get(self.rounds or 0, {})

    def to_json(self) -> str:
        """summary.json's text (keys sorted; unset parts left out)."""
        body = self.model_dump(mode="json", exclude_none=True)
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: str) -> RunSummary:
        """Parse summary.json; a file that does not fit says where and what is wrong."""
        from medfed.core.errors import MedfedError

        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise MedfedError(
                f"The run summary does not fit medfed's schema: {key}: {first['msg']}.",
                where=where,
                expected="summary.json as medfed writes it when a run ends",
                fix="it was edited or damaged: the run's events.jsonl and checkpoints/ "
                "still hold its history; move summary.json aside to let the server "
                "resume or close the run again",
            ) from None


def rounds_without_model(events: list[RunEvent], rounds: int) -> list[int]:
    """Rounds 1..``rounds`` that no ``round-finished`` event gave a new model.

    A resumed run's folder holds each attempt's events: a round counts once any of
    its attempts gave a model.
    """
    gave = {
        e.round
        for e in events
        if e.is_("round-finished") and e.round is not None and not e.get("model_unchanged")
    }
    return [r for r in range(1, rounds + 1) if r not in gave]


def no_model_reason(events: list[RunEvent], rounds: int) -> str:
    """Why a run whose every round was lost is a failure, with the first round's cause."""
    causes = [str(e.get("reason", "")) for e in events if e.is_("round-lost")]
    first = causes[0].splitlines()[0] if causes else "no update could be aggregated"
    return (
        f"no round gave a new model: all {rounds} round(s) were lost, the model is the "
        f"initial one (first cause: {first}); see the site errors in events.jsonl"
    )
