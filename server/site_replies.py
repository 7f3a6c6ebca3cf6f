"""The server's one reading of a site's reply: Flower records in, a typed answer out.

The ClientApp (``client/app.py``) writes a reply's records from the wire schema
(:mod:`medfed.core.schema`); here the ServerApp side reads them back, once, for the
grid wrapper, the streaming mean and secure aggregation alike. Nothing else on the
server looks inside a reply's records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from medfed.core import wire
from medfed.core.packing import WEIGHTS_KEY, npy_view
from medfed.core.schema import SecAggReply, SiteError, SiteRecord


@dataclass(frozen=True)
class SiteAnswer:
    """One reply of one node: its result, or why it has none."""

    node: int
    #: The site name the reply carries (None: an error reply, or a reply without one).
    site: str | None = None
    #: The medfed version the site reports (None: not reported, e.g. an older site).
    version: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: The secure-aggregation bytes (None: the reply has none).
    secagg: SecAggReply | None = None
    #: An error reply's reason as sent, and the site error it holds (None: unreadable).
    failure: str | None = None
    error: SiteError | None = None
    #: Why the records could not be read (a malformed reply), if so.
    unreadable: str | None = None
    _reply: Message | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the reply is not an error reply (its records may still be unreadable)."""
        return self.failure is None

    def name(self, fallback: str | None = None) -> str:
        """The site's name: as it replied, else ``fallback``, else ``node-N``."""
        return self.site or fallback or f"node-{self.node}"

    def update(self) -> np.ndarray:
        """The reply's weights vector, read in place (KeyError when it has none)."""
        assert self._reply is not None
        return npy_view(self._reply.content[wire.ARRAYS_KEY][WEIGHTS_KEY].data)

    @classmethod
    def of(cls, reply: Message, *, node: int | None = None) -> SiteAnswer:
        """Read ``reply`` (sent by ``node``; default: its source node)."""
        src = int(reply.metadata.src_node_id if node is None else node)
        if reply.has_error():
            reason = str(reply.error.reason)
            return cls(src, failure=reason, error=SiteError.parse(reason), _reply=reply)
        content = reply.content
        try:
            who = (
                SiteRecord.from_record(content[wire.SITE_RECORD_KEY])
                if wire.SITE_RECORD_KEY in content
                else None
            )
            metrics = dict(content[wire.METRICS_KEY]) if wire.METRICS_KEY in content else {}
            secagg = (
                SecAggReply.from_record(content[wire.SECAGG_RECORD_KEY])
                if wire.SECAGG_RECORD_KEY in content
                else None
            )
        except (KeyError, ValueError, TypeError) as exc:
            return cls(src, unreadable=f"{type(exc).__name__}: {exc}", _reply=reply)
        return cls(
            src,
            site=who.name if who else None,
            version=who.version if who else None,
            metrics=metrics,
            secagg=secagg,
            _reply=reply,
        )
