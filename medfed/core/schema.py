"""Typed records that cross the wire between server and site (their keys are here only).

:mod:`medfed.core.wire` names the Flower message keys of the run and its config; the
records a site sends back are typed here, each with one way to write it and one way
to read it:

- :class:`SiteRecord`: who replied, the site's name and its medfed version;
- :class:`SecAggReply`: the secure-aggregation bytes of a reply (a join's key advert
  and identity key, a masked update's header, an unmasking share);
- :class:`PrivacyReport`: the epsilon figures a site reports with each DP round;
- :class:`SiteError`: a refusal (with the site.toml rule behind it) or a failure, as
  an error reply's text: JSON after a fixed marker, read back without guessing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import Any, Literal

# ---- keys of Flower messages (one schema, written by the server, read by the site)
RUN_CONFIG_KEY = "medfed-run"  # ConfigRecord value: RunConfig as JSON
RUN_PROOF_KEY = "medfed-run-proof"  # the coordinator's signature on it (core/run_proof.py)
REVOCATIONS_KEY = "medfed-revoked-coordinators"  # the CA's CRL of coordinator certificates
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx.configure_train
#: train config: the fixed number of local steps a round asks of every site (SCAFFOLD)
LOCAL_STEPS_KEY = "local-steps"
#: train ArrayRecord key beside the model: SCAFFOLD's server control variate, packed like
#: the model's shared parameters (drift per local step, ``medfed.core.scaffold``)
SCAFFOLD_CONTROL_KEY = "scaffold-control"
#: query config: 1 asks the site for its intensity landmarks (harmonization "histogram")
LANDMARKS_QUERY_KEY = "intensity-landmarks"
#: train/evaluate config: the federation's standard landmarks (JSON list of numbers)
STANDARD_LANDMARKS_KEY = "standard-landmarks"
SERVER_ROUND_KEY = "server-round"  # set by every Flower strategy
#: evaluate config: keep this message's model (its digest, ``packing.model_digest``);
#: train config, with no arrays: train from the model kept under this digest
HELD_MODEL_KEY = "medfed-held-model"
#: The rule of a site's "failed" reply to a train message naming a model it does not hold
HELD_MODEL_RULE = "held-model"
ARRAYS_KEY = "arrays"  # Flower strategies' default ArrayRecord key
CONFIG_KEY = "config"  # Flower strategies' default ConfigRecord key
METRICS_KEY = "metrics"
SITE_RECORD_KEY = "medfed-site"  # reply ConfigRecord: SiteRecord (the site's name, version)
WEIGHT_KEY = "num-examples"  # Flower strategies' default weighting key
#: A join reply's metric: the last round of the run the site's privacy budget covers (counted
#: from the run's first round, so also after a resume), when it ends before the run does
BUDGET_ROUNDS_KEY = "budget-rounds"
#: A join reply's metric: the noise multiplier a site raised to fit its remaining budget
FITTED_NOISE_KEY = "fitted-noise"

# ---- secure aggregation (medfed.core.secagg) on Flower messages
SECAGG_JOIN = "secagg-join"  # query config: the run's SecAggConfig as JSON
SECAGG_UNMASK = "secagg-unmask"  # query config: UnmaskRequest bytes
#: query config: the run ended before its last round (its status): the sites that joined
#: forget its secure-aggregation keys and release what they held of their budgets
RUN_ENDED = "run-ended"
SECAGG_ROSTER = "secagg-roster"  # train config: Roster bytes
SECAGG_DIRECTORY = "secagg-directory"  # train config: JSON {site: identity key hex}
SECAGG_CERTIFICATES = "secagg-certificates"  # {site: PEM}: the CA vouches for each key
SECAGG_PARTICIPANTS = "secagg-participants"  # train config: JSON list of site ids
SECAGG_DEADLINE = "secagg-deadline"  # train config: epoch seconds; no update after it
SECAGG_RECORD_KEY = "medfed-secagg"  # reply ConfigRecord: advert/identity/update/reveal bytes

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


#: The fields of a reply's site record (``SITE_RECORD_KEY``).
SITE_NAME_FIELD = "name"
SITE_VERSION_FIELD = "medfed-version"
#: A version as a site may report it: a PEP 440 version (a local one too), nothing else.
_VERSION = re.compile(r"[0-9A-Za-z.+!_-]{1,64}")


@cache
def medfed_version() -> str:
    """The medfed version installed here (its distribution's, else the package's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medfed")
    except PackageNotFoundError:  # run from a source tree without installing
        import medfed

        return str(medfed.__version__)


@dataclass(frozen=True)
class SiteRecord:
    """Who replied: the site's name and the medfed version it runs (nothing else about it).

    Every reply carries one; a reply of a site older than the version field reads
    with ``version`` None ("not reported").
    """

    name: str
    version: str | None = None

    @classmethod
    def here(cls, name: str) -> SiteRecord:
        """The record of site ``name`` running this installation."""
        return cls(name, medfed_version())

    def entries(self) -> dict[str, str]:
        """The reply ConfigRecord's entries."""
        out = {SITE_NAME_FIELD: self.name}
        if self.version is not None:
            out[SITE_VERSION_FIELD] = self.version
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SiteRecord:
        """Read a reply's site record; a missing name or a malformed version is refused."""
        name = record.get(SITE_NAME_FIELD)
        if not isinstance(name, str):
            raise ValueError(f"the site record's {SITE_NAME_FIELD!r} is {type(name).__name__}")
        version = record.get(SITE_VERSION_FIELD)
        if version is not None and not (isinstance(version, str) and _VERSION.fullmatch(version)):
            raise ValueError(
                f"the site record's {SITE_VERSION_FIELD!r} is {version!r}, not a version "
                "(up to 64 letters, digits and . + ! _ -)"
            )
        return cls(name, version)


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


#: The metric keys of a site's landmark report (the answer to a landmarks query).
LANDMARKS_KEY = "landmarks"
LANDMARK_SCANS_KEY = "landmark-scans"


@dataclass(frozen=True)
class LandmarkReport:
    """A site's intensity landmarks (mean over its training scans) and how many scans."""

    landmarks: tuple[float, ...]
    scans: int

    def metrics(self) -> dict[str, Any]:
        """The report as reply metrics."""
        return {LANDMARKS_KEY: [float(v) for v in self.landmarks], LANDMARK_SCANS_KEY: self.scans}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any]) -> LandmarkReport:
        """Read a reply's report; a missing, non-finite or unordered one is refused (ValueError)."""
        try:
            values = tuple(_number(v) for v in metrics[LANDMARKS_KEY])
            scans = _int(metrics[LANDMARK_SCANS_KEY])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a landmark report: {exc}") from None
        if (
            scans < 1
            or len(values) < 2
            or any(b <= a for a, b in zip(values, values[1:], strict=False))
        ):
            raise ValueError("a landmark report needs >= 1 scan and increasing landmarks")
        return cls(values, scans)


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


@dataclass(frozen=True)
class SiteInstruction:
    """What the server asks of a site in one train, evaluate or query message, typed.

    Written on the server side with :meth:`entries` (the ServerApp, its secure
    aggregation; Flower's strategies add the round and FedProx's ``proximal_mu``),
    read once at the site with :meth:`read`, the only readers of these keys.
    A value of the wrong type is refused naming its key.
    """

    run: str = ""  # the run's configuration (RunConfig JSON) as the coordinator signed it
    proof: str = ""  # the coordinator's signature on ``run`` (core/run_proof.py)
    revocations: str = ""  # the CA's revocation list of coordinator certificates (PEM)
    server_round: int = 0
    proximal_mu: float = 0.0
    local_steps: int = 0  # train: exactly this many local steps (0: the run's epochs)
    landmarks_query: int = 0  # query: 1 asks for the site's intensity landmarks
    standard_landmarks: tuple[float, ...] = ()  # train/evaluate: the agreed standard
    join: str = ""  # query: join the run's secure aggregation (its SecAggConfig, JSON)
    unmask: bytes = b""  # query: an unmasking request (UnmaskRequest bytes)
    run_ended: str = ""  # query: the run ended before its last round (its status)
    roster: bytes = b""  # train, first round: the run's secure-aggregation roster
    directory: dict[str, str] = field(default_factory=dict)  # site -> identity key (hex)
    certificates: dict[str, str] = field(default_factory=dict)  # site -> the CA's PEM
    participants: tuple[str, ...] = ()  # train: the round's secure-aggregation sites
    deadline: float | None = None  # train: epoch seconds; no masked update after it
    held_model: str = ""  # evaluate: keep the model; train without arrays: use the one kept

    def entries(self) -> dict[str, str | int | float | bytes]:
        """The ConfigRecord entries of the fields set (a default is left out)."""
        out: dict[str, str | int | float | bytes] = {}
        for name, key, encode in _INSTRUCTION_KEYS:
            value = getattr(self, name)
            if value != _INSTRUCTION_DEFAULTS[name]:
                out[key] = encode(value)
        return out

    @classmethod
    def read(cls, config: Mapping[str, Any], blobs: Mapping[str, bytes]) -> SiteInstruction:
        """The instruction of a request's config values and bytes values (ValueError if bad)."""
        values: dict[str, Any] = {}
        merged = {**config, **blobs}
        for name, key, _ in _INSTRUCTION_KEYS:
            if key not in merged or merged[key] is None:
                continue
            try:
                values[name] = _INSTRUCTION_DECODE[name](merged[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"the request's {key!r} is not a valid {name.replace('_', ' ')}: {exc}"
                ) from None
        return cls(**values)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{type(value).__name__}, expected text")
    return value


def _blob(value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{type(value).__name__}, expected bytes")
    return bytes(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise TypeError(f"{value!r}, expected a whole number")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"{value!r}, expected a finite number")
    return float(value)


def _text_map(value: Any) -> dict[str, str]:
    parsed = json.loads(_text(value))
    if not isinstance(parsed, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
    ):
        raise TypeError("expected a JSON object of text values")
    return parsed


def _names(value: Any) -> tuple[str, ...]:
    parsed = json.loads(_text(value))
    if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
        raise TypeError("expected a JSON list of site names")
    return tuple(parsed)


def _numbers(value: Any) -> tuple[float, ...]:
    parsed = json.loads(_text(value))
    if not isinstance(parsed, list):
        raise TypeError("expected a JSON list of numbers")
    return tuple(_number(v) for v in parsed)


#: (field, key, encode) of every SiteInstruction field, in the order they are written.
_INSTRUCTION_KEYS: tuple[tuple[str, str, Any], ...] = (
    ("run", RUN_CONFIG_KEY, str),
    ("proof", RUN_PROOF_KEY, str),
    ("revocations", REVOCATIONS_KEY, str),
    ("server_round", SERVER_ROUND_KEY, int),
    ("proximal_mu", PROXIMAL_MU_KEY, float),
    ("local_steps", LOCAL_STEPS_KEY, int),
    ("landmarks_query", LANDMARKS_QUERY_KEY, int),
    ("standard_landmarks", STANDARD_LANDMARKS_KEY, lambda v: json.dumps([float(x) for x in v])),
    ("join", SECAGG_JOIN, str),
    ("unmask", SECAGG_UNMASK, bytes),
    ("run_ended", RUN_ENDED, str),
    ("roster", SECAGG_ROSTER, bytes),
    ("directory", SECAGG_DIRECTORY, lambda d: json.dumps(d, sort_keys=True)),
    ("certificates", SECAGG_CERTIFICATES, lambda d: json.dumps(d, sort_keys=True)),
    ("participants", SECAGG_PARTICIPANTS, lambda p: json.dumps(list(p))),
    ("deadline", SECAGG_DEADLINE, float),
    ("held_model", HELD_MODEL_KEY, str),
)
_INSTRUCTION_DECODE: dict[str, Any] = {
    "run": _text,
    "proof": _text,
    "revocations": _text,
    "server_round": _int,
    "proximal_mu": _number,
    "local_steps": _int,
    "landmarks_query": _int,
    "standard_landmarks": _numbers,
    "join": _text,
    "unmask": _blob,
    "run_ended": _text,
    "roster": _blob,
    "directory": _text_map,
    "certificates": _text_map,
    "participants": _names,
    "deadline": _number,
    "held_model": _text,
}
_INSTRUCTION_DEFAULTS: dict[str, Any] = {
    f.name: (f.default_factory() if callable(f.default_factory) else f.default)  # type: ignore[misc]
    for f in fields(SiteInstruction)
}
