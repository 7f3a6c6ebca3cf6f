"""The federation's revoked coordinators, as the site last learnt them (a CA-signed CRL).

The server attaches the CA's revocation list of coordinator certificates to every
run's messages. The site keeps the newest it has checked (by CRL number; one never
replaces a newer one), so a relay that later withholds it, or replays an older one,
does not bring a revoked coordinator back; a run signed by a revoked coordinator is
refused.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cryptography import x509

from medfed.core.files import atomic_write
from medfed.core.key_certs import CertificateRejected, check_revocations, read_revocations
from medfed.core.run_proof import RunProofError

REVOCATIONS_FILE = "keys/revoked-coordinators.pem"


class CoordinatorRevocations:
    """The newest CA-signed revocation list this site has seen (REVOCATIONS_FILE)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._held: tuple[int, frozenset[int]] | None = None  # (CRL number, serials)

    def _stored(self) -> tuple[int, frozenset[int]]:
        """The kept list (read once; this worker is its only writer).

        It was checked against the pinned CA before it was kept, so it is not checked
        again: after a CA rotation it still holds, though the old CA signed it.
        """
        if self._held is None:
            if not self.path.exists():
                self._held = (-1, frozenset())
            else:
                try:
                    self._held = read_revocations(self.path.read_text(encoding="utf-8"))
                except (CertificateRejected, OSError, UnicodeDecodeError) as exc:
                    raise RunProofError(  # fail closed: without it a revoked coordinator passes
                        f"the site's copy of the coordinator revocation list ({self.path}) is "
                        f"unreadable ({exc}); no run is accepted until it is restored or "
                        "deleted (the server sends the current one with the next run)"
                    ) from None
        return self._held

    def revoked(self, attached: str, cas: list[x509.Certificate]) -> frozenset[int]:
        """Serials revoked, after adopting ``attached`` (the list a message carried) if newer."""
        with self._lock:
            number, serials = self._stored()
            if not attached:
                return serials
            try:
                new_number, new_serials = check_revocations(attached, cas)
            except CertificateRejected as exc:
                raise RunProofError(f"{exc}; the run is refused") from None
            if new_number <= number:  # the kept list is as new or newer: it stands
                return serials
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, attached.encode())
            self._held = (new_number, new_serials | serials)
            return self._held[1]
