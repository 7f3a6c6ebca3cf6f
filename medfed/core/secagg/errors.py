"""Typed secure-aggregation errors: each names the site, what was wrong and what to do."""

from __future__ import annotations

from medfed.core.errors import MedfedError


class SecAggError(MedfedError):
    """Base class of every secure-aggregation error (fail closed: nothing is sent or summed)."""


class RosterError(SecAggError):
    """A key advertisement or the roster is invalid, unsigned, or from another run."""


class InputError(SecAggError):
    """A site's own update or weight cannot be encoded (non-finite, wrong shape, out of range)."""


class ProtocolError(SecAggError):
    """A step was called out of order, or a request contradicts what this side already did."""


class RecoveryError(SecAggError):
    """The round cannot be unmasked: too few survivors, missing reveals, inconsistent shares."""


class UpdateRejected(SecAggError):
    """The server-side aggregator refused a message from ``site_id``.

    Attributes
    ----------
    site_id : str
        The site the rejected message claims to come from.
    reason : str
        One of ``"tampered"``, ``"truncated"``, ``"replayed"``, ``"duplicate"``,
        ``"late"``, ``"unknown-site"``, ``"malformed"``.
    """

    reason = "rejected"

    def __init__(self, site_id: str, what: str, *, expected: str = "", fix: str = "") -> None:
        self.site_id = site_id
        super().__init__(
            f"secure aggregation rejected a message from site {site_id!r} ({self.reason}): {what}",
            where=f"site {site_id!r}",
            expected=expected,
            fix=fix,
        )


class TamperedUpdateError(UpdateRejected):
    """The signature does not verify over the message as received."""

    reason = "tampered"


class TruncatedUpdateError(UpdateRejected):
    """The payload is shorter or longer than its signed header says."""

    reason = "truncated"


class ReplayedUpdateError(UpdateRejected):
    """The message is for another run or round, or the site already contributed."""

    reason = "replayed"


class LateUpdateError(UpdateRejected):
    """The message arrived after its round's collection closed (dropouts declared)."""

    reason = "late"


class UnknownSiteError(UpdateRejected):
    """The sender is not in the run's roster."""

    reason = "unknown-site"


class MalformedMessageError(UpdateRejected):
    """The bytes do not decode as the expected message type."""

    reason = "malformed"
