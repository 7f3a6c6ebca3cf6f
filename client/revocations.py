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
from medfed.core.key_certs import CertificateRejected, check_revocations
from medfed.core.run_proof import RunProofError

REVOCATIONS_FILE = "keys/revoked-coordinators.pem"


class CoordinatorRevocations:
    """The newest CA-signed revocation list this site has seen (REVOCATIONS_FILE)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _stored(self, cas: list[x509.Certificate]) -> tuple[int, frozenset[int]]:
        if not self.path.exists():
            return -1, frozenset()
        try:
            return check_revocations(self.path.read_text(encoding="utf-8"), cas)
        except (CertificateRejected, OSError, UnicodeDecodeError) as exc:
            raise RunProofError(  # fail closed: without it a revoked coordinator passes
                f"the site's copy of the coordinator revocation list ({self.path}) does not "
                f"check ({exc}); no run is accepted until it is restored or deleted (the "
                "server sends the current one with the next run)") from None

    def revoked(self, attached: str, cas: list[x509.Certificate]) -> frozenset[int]:
        """Serials revoked, after adopting ``attached`` (the list a message carried) if newer."""
        with self._lock:
            number, serials = self._stored(cas)
            if not attached:
                return serials
            try:
                new_number, new_serials = check_revocations(attached, cas)
            except CertificateRejected as exc:
                raise RunProofError(f"{exc}; the run is refused") from None
            if new_number <= number:
                return serials | new_serials if new_number == number else serials
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, attached.encode())
            return new_serials | serials
