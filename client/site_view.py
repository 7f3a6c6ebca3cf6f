"""What the site's own dashboard shows, read from the site's files: nothing that names a patient.

The same files `medfed site audit`, `budget` and `scan` read: the hash-chained audit
log (what left the site, the chain's status, refusals with their rule), the privacy
ledger (checked against the audit log, as `medfed site budget`) and the scan report
(scan-report.json beside site.toml).

Patients. Audit records of a healed cache entry name a file and a series, an error's
reason may quote a path; the scan report holds per-series ids. None of that is shown:
only counts, sizes, hashes, run ids, rules, and reasons with UIDs, paths and file
names masked (:func:`masked`). A bare file name without an extension (DICOM files
often have none) cannot be told from a word; medfed's own messages quote files with
their folder, which is masked.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medfed.client.audit import AuditLog
from medfed.client.ledger import LedgerError
from medfed.client.ledger_audit import AuditedSpends, check_ledger
from medfed.core.config import SiteConfig, load_toml, resolve

#: What leaves the site: these audit events are written before a reply is sent.
OUTBOUND = ("update-sent", "reveal-sent", "metrics-sent")
#: Audit events that carry the site rule which refused (its policy; its ledger at start).
REFUSALS = ("refused", "ledger-refused")

# DICOM UIDs (dotted digit groups), file paths (any word with a path separator: one
# is enough, "/Doe^Jane" names a patient) and file names (a word with an image or
# data file's extension): masked wherever free text is shown. Masking a harmless "and/or" is the
# price; a count like "3/10" is kept.
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_PATH = re.compile(r"[^\s'\"(),;<>\[\]]*[/\\][^\s'\"(),;<>\[\]]*")
_FILE = re.compile(
    r"[^\s'\"(),;<>/\\\[\]]+\.(?:dcm|dicom|ima|nii|mgz|mha|mhd|nrrd|img|hdr|raw|json|csv|txt"
    r"|png|jpe?g|tiff?|zip|tar|npz|npy|pt|pth)(?:\.gz)?\b",
    re.IGNORECASE,
)
_COUNT = re.compile(r"\d+/\d+[:.!?]?")  # "round 3/10:"
MASK = "[masked]"


def masked(text: str) -> str:
    """``text`` with DICOM UIDs, file paths and file names replaced by [masked]."""
    text = _UID.sub(MASK, text)
    text = _PATH.sub(lambda m: m[0] if _COUNT.fullmatch(m[0]) else MASK, text)
    return _FILE.sub(MASK, text)


@dataclass(frozen=True)
class Sent:
    """One reply that left the site: no payload, only its size, hash and cost."""

    time: str
    event: str
    run_id: str
    round: int | None
    bytes: int | None
    hash: str
    epsilon_round: float | None
    epsilon_run: float | None


@dataclass(frozen=True)
class Refusal:
    """A refusal the site's policy made, with its rule."""

    time: str
    run_id: str
    round: int | None
    rule: str
    reason: str


@dataclass(frozen=True)
class SiteState:
    """Everything the site page shows."""

    site: str
    chain: dict[str, Any]
    sent: list[Sent]
    sent_bytes: int
    events: dict[str, int]
    refusals: list[Refusal]
    budget: dict[str, Any]
    scan: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


class SiteView:
    """The site's state, read again only when the audit log, ledger or scan report changed."""

    def __init__(self, config: Path, *, last: int = 200) -> None:
        self.config = Path(config)
        self.cfg = load_toml(self.config, SiteConfig)
        self.audit_path = resolve(self.config, self.cfg.site.audit_log)
        self.ledger_path = resolve(self.config, self.cfg.privacy.ledger)
        self.scan_path = self.config.resolve().parent / "scan-report.json"
        self.last = last
        self._lock = threading.Lock()
        self._cached: tuple[Any, SiteState] | None = None

    def state(self) -> SiteState:
        """What the page shows now."""
        key = tuple(_stamp(p) for p in (self.audit_path, self.ledger_path, self.scan_path))
        with self._lock:
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1]
            state = self._read()
            self._cached = (key, state)
            return state

    def _read(self) -> SiteState:
        log = AuditLog(self.audit_path)
        records = log.read()
        v = log.verify()
        chain = {
            "intact": v.intact,
            "records": v.records,
            "chained": v.chained,
            "legacy": v.legacy,
            "head_seq": v.head_seq,
            "head": v.head,
            "breaks": [{"line": b.line, "what": masked(b.what)} for b in v.breaks],
            "torn": len(v.torn),
        }
        sent = [_sent(r) for r in records if r.get("event") in OUTBOUND]
        refusals = [
            Refusal(
                time=str(r.get("time", ""))[:19].replace("T", " "),
                run_id=str(r.get("run_id", "")),
                round=r.get("round") if isinstance(r.get("round"), int) else None,
                rule=str(r.get("rule", "")),
                reason=masked(str(r.get("reason", ""))),
            )
            for r in records
            if r.get("event") in REFUSALS
        ]
        problems: list[str] = []
        budget = self._budget(records, problems)
        return SiteState(
            site=self.cfg.site.name,
            chain=chain,
            sent=sent[-self.last :][::-1],
            sent_bytes=sum(s.bytes or 0 for s in sent),
            events=dict(Counter(str(r.get("event")) for r in records)),
            refusals=refusals[-self.last :][::-1],
            budget=budget,
            scan=self._scan(problems),
            problems=problems,
        )

    def _budget(self, records: list[dict[str, Any]], problems: list[str]) -> dict[str, Any]:
        """Epsilon per dataset (its policy, spent, left) and per run, as `medfed site budget`."""
        datasets = sorted(self.cfg.privacy.datasets.items())
        try:
            ledger = check_ledger(self.ledger_path, AuditedSpends.of(records), config=self.config)
        except LedgerError as exc:
            problems.append(f"privacy ledger: {masked(exc.what)}")
            ledger = None
        spent = {name: ledger.spent(name) if ledger else 0.0 for name, _ in datasets}
        runs = ledger.summary().runs if ledger else []
        return {
            "datasets": [
                {
                    "dataset": name,
                    "epsilon_max": b.epsilon_max,
                    "spent": spent[name],
                    "remaining": b.epsilon_max - spent[name],
                }
                for name, b in datasets
            ],
            "runs": [
                {
                    "run_id": r.run_id,
                    "dataset": r.dataset,
                    "epsilon": r.epsilon,
                    "delta": r.delta,
                    "rounds": r.rounds,
                    "unit": r.unit,
                    "last": r.last[:19].replace("T", " "),
                }
                for r in runs
            ],
        }

    def _scan(self, problems: list[str]) -> dict[str, Any] | None:
        """The scan report's counts (never its series or file ids)."""
        if not self.scan_path.is_file():
            return None
        try:
            report = json.loads(self.scan_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            problems.append(f"scan report unreadable: {type(exc).__name__}")
            return None
        series = report.get("series") or []
        return {
            "files_total": report.get("files_total"),
            "files_used": report.get("files_used"),
            "files_skipped": report.get("files_skipped"),
            "skipped_by_reason": {
                masked(str(k)): v for k, v in (report.get("skipped_by_reason") or {}).items()
            },
            "series": len(series),
            "modalities": dict(Counter(str(s.get("modality", "?")) for s in series)),
            "labelled": sum(1 for s in series if s.get("label")),
        }


def _sent(r: dict[str, Any]) -> Sent:
    privacy = r.get("privacy") or {}
    return Sent(
        time=str(r.get("time", ""))[:19].replace("T", " "),
        event=str(r.get("event")),
        run_id=str(r.get("run_id", "")),
        round=r.get("round") if isinstance(r.get("round"), int) else None,
        bytes=r.get("bytes") if isinstance(r.get("bytes"), int) else None,
        hash=str(r.get("hash") or "")[:23],
        epsilon_round=privacy.get("epsilon_round"),
        epsilon_run=privacy.get("epsilon_run"),
    )
