"""Secure aggregation (pairwise masking, SecAgg family) as pure Python/numpy.

Site: :class:`SiteSession` (advertise, accept_roster, mask_update, reveal,
audit_entry). Server: :class:`Aggregator` (begin_round, add, close_collection,
add_reveal, result). Messages serialise to bytes (and one numpy vector). No
transport here: the server and client packages carry these messages in Flower
records. Protocol, threat model and error bound: docs/secure-aggregation.md.
"""

from medfed.core.secagg.config import FixedPoint, SecAggConfig, SecAggConfigError
from medfed.core.secagg.errors import (
    InputError,
    LateUpdateError,
    MalformedMessageError,
    ProtocolError,
    RecoveryError,
    ReplayedUpdateError,
    RosterError,
    SecAggError,
    TamperedUpdateError,
    TruncatedUpdateError,
    UnknownSiteError,
    UpdateRejected,
)
from medfed.core.secagg.identity import SiteIdentity, fingerprint
from medfed.core.secagg.messages import KeyAdvert, MaskedUpdate, Reveal, Roster, UnmaskRequest
from medfed.core.secagg.quantize import error_bound
from medfed.core.secagg.server import Aggregator, RoundStatus
from medfed.core.secagg.site import SiteSession

__all__ = [
    "Aggregator",
    "FixedPoint",
    "InputError",
    "KeyAdvert",
    "LateUpdateError",
    "MalformedMessageError",
    "MaskedUpdate",
    "ProtocolError",
    "RecoveryError",
    "ReplayedUpdateError",
    "Reveal",
    "Roster",
    "RosterError",
    "RoundStatus",
    "SecAggConfig",
    "SecAggConfigError",
    "SecAggError",
    "SiteIdentity",
    "SiteSession",
    "TamperedUpdateError",
    "TruncatedUpdateError",
    "UnknownSiteError",
    "UnmaskRequest",
    "UpdateRejected",
    "error_bound",
    "fingerprint",
]
