"""Typed records that cross the wire between server and site (their keys are here only).

:mod:`medfed.core.wire` names the Flower message keys of the run and its config; the
records a site sends back are typed here, each with one way to write it and one way
to read it:

- :class:`SecAggReply`: the secure-aggregation bytes of a reply (a join's key advert
  and identity key, a masked update's header, an unmasking share);
- :class:`PrivacyReport`: the epsilon figures a site reports with each DP round;
- :class:`SiteError`: a refusal (with the site.toml rule behind it) or a failure, as
  an error reply's text: JSON after a fixed marker, read back without guessing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

#: The fields of a reply's secure-aggregation record (``wire.SECAGG_RECORD_KEY``).
SECAGG_FIELDS = ("advert", "identity", "update", "reveal")


@dataclass(frozen=True)
class SecAggReply:
    """The secure-aggregation bytes of one reply; a reply carries the ones its phase needs."""

    advert: bytes | None = None  # join: the site's signed per-run key advert
    identity: bytes | None = None  # join: the site's long-term identity key
    update: bytes | None = None  # train: the masked update's header
    reveal: bytes | None = None  # unmask: the site's shares for the dropped sites

    def blobs(self) -> dict[str, bytes]:
        """The fields that are set, by name (what the record holds)."""
        return {f: v for f in SECAGG_FIELDS if (v := getattr(self, f)) is not None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SecAggReply:
        """Read a reply's record; an unknown field or a value that is not bytes is refused."""
        unknown = set(record) - set(SECAGG_FIELDS)
        if unknown:
            raise ValueError(f"unknown secure-aggregation fields {sorted(unknown)}")
        for name, value in record.items():
            if not isinstance(value, bytes | bytearray):
                raise ValueError(f"secure-aggregation field {name!r} is {type(value).__name__}")
        return cls(**{k: bytes(v) for k, v in record.items()})

    def need(self, name: Literal["advert", "identity", "update", "reveal"]) -> bytes:
        """The field ``name``; a reply without it is refused (KeyError naming it)."""
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"the reply has no secure-aggregation {name!r}")
        return value


#: The metric keys of a site's privacy report (metrics.jsonl keeps them as sent).
EPSILON_KEY = "epsilon"
EPSILON_RUN_KEY = "epsilon-run"
EPSILON_REMAINING_KEY = "epsilon-remaining"
NOISE_MULTIPLIER_KEY = "noise-multiplier"


@dataclass(frozen=True)
class PrivacyReport:
    """A DP round's epsilon figures, as the site reports them with its update."""

    epsilon: float  # this round's
    epsilon_run: float  # the run's so far, at this site
    epsilon_remaining: float  # the site's budget left on the dataset
    noise_multiplier: float  # the noise the site added

    _KEYS = (EPSILON_KEY, EPSILON_RUN_KEY, EPSILON_REMAINING_KEY, NOISE_MULTIPLIER_KEY)

    def metrics(self) -> dict[str, float]:
        """The report as reply metrics."""
        values = (self.epsilon, self.epsilon_run, self.epsilon_remaining, self.noise_multiplier)
        return {k: float(v) for k, v in zip(self._KEYS, values, strict=True)}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> PrivacyReport | None:
        """The report in a site's metrics (None: a round without DP).

        A figure the metrics lack (written by an older site) reads as NaN.
        """
        if EPSILON_RUN_KEY not in metrics:
            return None
        return cls(*(float(metrics.get(k, math.nan)) for k in cls._KEYS))


#: What starts the JSON of a site error in an error reply's text.
SITE_ERROR_MARKER = "medfed-site-error "


@dataclass(frozen=True)
class SiteError:
    """Why a site did not reply with a result, as the server reads it from an error reply.

    ``refused``: the site's policy or privacy budget said no, under the site.toml rule
    ``rule``; it says no again to every later round of the same run. ``failed``: the
    round broke at the site (bad input, a crash); a later round may succeed.
    """

    site: str
    status: Literal["refused", "failed"]
    rule: str
    reason: str

    def text(self) -> str:
        """The error reply's text (:meth:`parse` reads it back)."""
        return SITE_ERROR_MARKER + json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> SiteError | None:
        """The site error in an error reply's reason, or None when it holds none.

        The ClientApp's executor puts the exception's type before the text; the JSON
        after the marker is the record.
        """
        kind, sep, rest = text.partition(": ")
        if text.startswith(SITE_ERROR_MARKER):
            record = text
        elif sep and kind.replace(".", "").replace("_", "").isalnum():  # "RuntimeError: "
            record = rest
        else:
            return None
        if not record.startswith(SITE_ERROR_MARKER):  # e.g. an error that quotes one
            return None
        try:
            body = json.loads(record[len(SITE_ERROR_MARKER) :])
        except json.JSONDecodeError:
            return None
        names = {f.name for f in fields(cls)}
        if not isinstance(body, dict) or set(body) != names:
            return None
        if body["status"] not in ("refused", "failed"):
            return None
        return cls(**{k: str(v) for k, v in body.items()})  # type: ignore[arg-type]


@dataclass(frozen=True)
class SiteRequest:
    """A request to a site's worker: the operation, the server's run id, the round config.

    ``op``: train, evaluate, query (secure-aggregation join and unmasking, a run's
    early end) or ping; the worker refuses any other by name.

    ``config`` holds the message's config values (``wire.RUN_CONFIG_KEY``, the round,
    secure-aggregation entries); its bytes values and arrays travel beside it.
    """

    op: str
    run_id: str | int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, Any]:
        """The local-channel frame header."""
        return {"op": self.op, "config": self.config, "run_id": self.run_id}

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> SiteRequest:
        """A request from a frame header; a config that is not a mapping is refused."""
        config = header.get("config") or {}
        if not isinstance(config, dict):
            raise ValueError(f"the request's config is {type(config).__name__}, not a mapping")
        return cls(op=str(header.get("op", "")), run_id=header.get("run_id"), config=config)


@dataclass(frozen=True)
class SiteReply:
    """A site worker's answer: a result with its metrics, or a refusal/failure with why."""

    site: str
    ok: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    error: SiteError | None = None

    @classmethod
    def result(cls, site: str, metrics: Mapping[str, Any] | None = None) -> SiteReply:
        """A result (its arrays travel beside it)."""
        return cls(site=site, ok=True, metrics=dict(metrics or {}))

    @classmethod
    def refusal(
        cls, site: str, rule: str, reason: str, *, status: Literal["refused", "failed"]
    ) -> SiteReply:
        """A refusal under a site.toml ``rule``, or a failure (``rule`` may be empty)."""
        return cls(site=site, ok=False, error=SiteError(site, status, rule, reason))

    def header(self) -> dict[str, Any]:
        """The local-channel frame header."""
        if self.ok or self.error is None:
            return {"ok": True, "site": self.site, "metrics": self.metrics}
        e = self.error
        return {
            "ok": False,
            "site": self.site,
            "status": e.status,
            "rule": e.rule,
            "reason": e.reason,
        }

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> SiteReply:
        """A reply from a frame header (an error reply without a reason says so)."""
        site = str(header.get("site", "?"))
        if header.get("ok"):
            return cls.result(site, header.get("metrics") or {})
        status = "refused" if header.get("status") == "refused" else "failed"
        return cls.refusal(
            site,
            str(header.get("rule", "")),
            str(header.get("reason", "no reason given")),
            status=status,
        )
