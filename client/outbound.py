"""A site's outbound path: the trained model becomes a reply through a chain of filters.

Each filter does one thing to the :class:`Outbound` reply and notes it in the reply's
trail; the trail is written into the round's one ``update-sent`` audit record, so the
site operator reads which filters ran, in which order, with what effect. The order is
data (the lists in :func:`train_chain` and :func:`resend_chain`), checked when a chain is built:
each filter names what must have happened before it (``needs``) and what it leaves
done (``provides``); a chain that runs a filter before what it needs is refused.

    local-split -> update-dp -> keep-for-resend -> mask -> ledger-commit -> audit

Why this order: update-level DP noises the plaintext update (after masking it could
not); the update is kept for a resend before anything can leave; the epsilon is
committed only once every step that can fail has passed; the audit record is the last
thing written before the reply leaves, and it holds the reply's hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from medfed.client.audit import AuditLog, arrays_digest
from medfed.client.privacy_guard import PrivacyGate, RoundPrivacy, noised_update
from medfed.client.released import (
    Released,
    ReleasedUpdates,
    model_digest,
    participants_of,
    run_digest,
)
from medfed.client.secure_site import SecureSite
from medfed.client.site_local import SiteLocalStore
from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.packing import WEIGHTS_KEY, pack, shared_state
from medfed.core.schema import SecAggReply, SiteInstruction


class OutboundOrderError(RuntimeError):
    """An outbound chain runs a filter before what it needs: a bug, never a site's input."""


@dataclass
class Outbound:
    """One round's reply on its way out of the site; the filters fill it in."""

    run: RunConfig
    run_id: str
    session: str
    round: int
    #: What the server asked (the round's secure-aggregation entries among it).
    asked: SiteInstruction
    #: The round's global model as one vector (what the site trained from).
    global_vec: np.ndarray
    metrics: dict[str, Any]
    #: The model after training (None on a resend: nothing was trained).
    trained: dict[str, np.ndarray] | None = None
    #: The parameters that stay at the site (site-specific layers of the adaptation).
    local_keys: frozenset[str] = frozenset()
    #: The gate's decision for this round (None on a resend).
    privacy: RoundPrivacy | None = None
    steps: int = 0
    weight: float = 0.0
    #: The update released on an earlier attempt of this round (a resend only).
    replay: Released | None = None
    vector: np.ndarray | None = None
    #: The reply's arrays, its protection and its secure-aggregation audit entry.
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    protection: str = ""
    secagg: dict[str, Any] | None = None
    privacy_record: dict[str, Any] = field(default_factory=dict)
    #: Each filter's entry, in the order they ran.
    trail: list[dict[str, Any]] = field(default_factory=list)


class Filter(Protocol):
    """One step of the outbound path."""

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    provides: ClassVar[frozenset[str]]

    def __call__(self, out: Outbound) -> None:
        """Do this filter's one thing to ``out`` and append its trail entry."""
        ...


@dataclass(frozen=True)
class SplitLocal:
    """Keep the site-specific parameters at the site; the rest become one shared vector."""

    store: SiteLocalStore
    name: ClassVar[str] = "local-split"
    needs: ClassVar[frozenset[str]] = frozenset({"trained"})
    provides: ClassVar[frozenset[str]] = frozenset({"shared-vector"})

    def __call__(self, out: Outbound) -> None:
        """Write the local parameters to the site's store; pack the shared ones."""
        assert out.trained is not None
        if out.local_keys:  # written before the reply leaves
            self.store.save(out.run_id, {k: out.trained[k] for k in out.local_keys})
        out.vector = pack(shared_state(out.trained, out.local_keys))
        out.trail.append({"filter": self.name, "kept_at_site": len(out.local_keys)})


@dataclass(frozen=True)
class UpdateDp:
    """Update-level DP: clip the update and add Gaussian noise (``--dp update`` only)."""

    name: ClassVar[str] = "update-dp"
    needs: ClassVar[frozenset[str]] = frozenset({"shared-vector"})
    provides: ClassVar[frozenset[str]] = frozenset({"final-vector"})

    def __call__(self, out: Outbound) -> None:
        """Noise the plaintext update when the round's privacy mode is "update"."""
        assert out.privacy is not None and out.vector is not None
        noised = out.privacy.mode == "update"
        if noised:
            out.vector = noised_update(
                out.global_vec, out.vector, out.run, out.privacy.noise_multiplier
            )
        out.trail.append({"filter": self.name, "noised": noised})


@dataclass(frozen=True)
class KeepForResend:
    """Keep the released update, so a server that loses the round gets it again."""

    store: ReleasedUpdates
    name: ClassVar[str] = "keep-for-resend"
    needs: ClassVar[frozenset[str]] = frozenset({"final-vector"})
    provides: ClassVar[frozenset[str]] = frozenset({"kept"})

    def __call__(self, out: Outbound) -> None:
        """Save the final (unmasked) update with what its reply says."""
        assert out.privacy is not None and out.vector is not None
        out.privacy_record = out.privacy.record(out.run, out.steps)
        self.store.save(
            out.run_id,
            Released(
                out.round,
                run_digest(out.run),
                model_digest(out.global_vec),
                participants_of(out.asked),
                out.vector,
                out.weight,
                dict(out.metrics),
                out.privacy_record,
            ),
        )
        out.trail.append({"filter": self.name})


@dataclass(frozen=True)
class Replay:
    """A resend: the update released on an earlier attempt, untouched (no new training)."""

    name: ClassVar[str] = "replay"
    needs: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset({"final-vector", "kept"})

    def __call__(self, out: Outbound) -> None:
        """Take the kept update, weight, metrics and privacy record as they were sent."""
        assert out.replay is not None
        out.vector = out.replay.vector
        out.weight = out.replay.weight
        out.metrics = dict(out.replay.metrics)
        out.privacy_record = {**out.replay.privacy, "resent": True}
        out.trail.append({"filter": self.name, "round": out.replay.round})


@dataclass(frozen=True)
class Mask:
    """Secure aggregation: mask the update under the round's pairwise keys (or send it plain)."""

    secure: SecureSite
    name: ClassVar[str] = "mask"
    needs: ClassVar[frozenset[str]] = frozenset({"final-vector", "kept"})
    provides: ClassVar[frozenset[str]] = frozenset({"reply-arrays"})

    def __call__(self, out: Outbound) -> None:
        """Set the reply's arrays: the masked update and its header, or the plain update."""
        assert out.vector is not None
        if out.run.secure_aggregation == "off":
            out.metrics[wire.WEIGHT_KEY] = out.weight
            out.arrays, out.protection, out.secagg = {WEIGHTS_KEY: out.vector}, "tls", None
        else:  # the site's weight travels inside the masked vector, not in plaintext
            header, masked, out.secagg = self.secure.mask(
                out.session,
                out.round,
                out.asked,
                global_vec=out.global_vec,
                local_vec=out.vector,
                weight=out.weight,
            )
            out.arrays = {WEIGHTS_KEY: masked}
            for name, blob in SecAggReply(update=header).blobs().items():
                out.arrays[wire.BYTES_PREFIX + name] = np.frombuffer(blob, dtype=np.uint8)
            out.protection = f"tls+secure-aggregation/{out.run.secure_aggregation}"
        out.trail.append({"filter": self.name, "protection": out.protection})


@dataclass(frozen=True)
class CommitBudget:
    """Commit the round's reserved epsilon in the ledger: the reply is about to leave."""

    gate: PrivacyGate
    name: ClassVar[str] = "ledger-commit"
    needs: ClassVar[frozenset[str]] = frozenset({"reply-arrays", "kept"})
    provides: ClassVar[frozenset[str]] = frozenset({"budget-settled"})

    def __call__(self, out: Outbound) -> None:
        """Commit the reservation (more steps than reserved blocks the reply)."""
        assert out.privacy is not None
        self.gate.commit(out.privacy, steps=out.steps)
        out.trail.append({"filter": self.name, "committed": out.privacy.reservation is not None})


@dataclass(frozen=True)
class MarkResent:
    """A resend spends no new epsilon: the ledger counts one more sending of the paid update."""

    gate: PrivacyGate
    name: ClassVar[str] = "ledger-resent"
    needs: ClassVar[frozenset[str]] = frozenset({"reply-arrays"})
    provides: ClassVar[frozenset[str]] = frozenset({"budget-settled"})

    def __call__(self, out: Outbound) -> None:
        """Count the resend on the update's spend record, when it had one."""
        record = out.privacy_record.get("ledger_record")
        if record is not None:
            self.gate.ledger.mark_resent(int(record))
        out.trail.append({"filter": self.name, "ledger_record": record})


@dataclass(frozen=True)
class AuditSent:
    """The round's ``update-sent`` record (fsync'ed): the last thing before the reply leaves."""

    audit: AuditLog
    name: ClassVar[str] = "audit"
    needs: ClassVar[frozenset[str]] = frozenset({"reply-arrays", "budget-settled"})
    provides: ClassVar[frozenset[str]] = frozenset({"audited"})

    def __call__(self, out: Outbound) -> None:
        """Write what leaves (bytes, hash, protection, privacy) and every filter's entry."""
        digest, size = arrays_digest(out.arrays)
        if not out.privacy_record and out.privacy is not None:
            out.privacy_record = out.privacy.record(out.run, out.steps)
        out.trail.append({"filter": self.name})
        resent = {"resent": True} if out.replay is not None else {}
        self.audit.record(
            "update-sent",
            run_id=out.run_id,
            round=out.round,
            task=out.run.task,
            bytes=size,
            hash=digest,
            protection=out.protection,
            privacy=out.privacy_record,
            secure_aggregation=out.secagg,
            metrics=out.metrics,
            outbound=out.trail,
            **resent,
        )


class OutboundChain:
    """Filters run in a fixed, checked order; the reply may leave once all have run."""

    def __init__(self, filters: Sequence[Filter], *, given: frozenset[str] = frozenset()) -> None:
        done: set[str] = set(given)
        for f in filters:
            missing = f.needs - done
            if missing:
                raise OutboundOrderError(
                    f"outbound filter {f.name!r} needs {sorted(missing)}, which no filter "
                    f"before it provides (order: {[g.name for g in filters]})"
                )
            done |= f.provides
        if not filters or filters[-1].name != AuditSent.name:
            raise OutboundOrderError(
                f"an outbound chain must end with the audit record; it ends with "
                f"{filters[-1].name if filters else 'nothing'!r}"
            )
        self.filters = tuple(filters)

    @property
    def names(self) -> list[str]:
        """The filters' names, in the order they run."""
        return [f.name for f in self.filters]

    def __call__(self, out: Outbound) -> Outbound:
        """Run every filter on ``out``; an exception stops the chain (nothing leaves)."""
        for f in self.filters:
            f(out)
        return out


def train_chain(
    *,
    site_local: SiteLocalStore,
    released: ReleasedUpdates,
    secure: SecureSite,
    gate: PrivacyGate,
    audit: AuditLog,
) -> OutboundChain:
    """The path of a freshly trained update (see the module's docstring for the order)."""
    return OutboundChain(
        [
            SplitLocal(site_local),
            UpdateDp(),
            KeepForResend(released),
            Mask(secure),
            CommitBudget(gate),
            AuditSent(audit),
        ],
        given=frozenset({"trained"}),
    )


def resend_chain(*, secure: SecureSite, gate: PrivacyGate, audit: AuditLog) -> OutboundChain:
    """The path of an update sent again to a server that lost its round."""
    return OutboundChain([Replay(), Mask(secure), MarkResent(gate), AuditSent(audit)])
