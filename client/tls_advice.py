"""What a site operator is told about a TLS failure with the server: who must do what."""

from __future__ import annotations

from pathlib import Path

from medfed.core.identity import TlsDiagnosis, TlsProblem


def tls_advice(diagnosis: TlsDiagnosis, *, server: str, ca_path: Path) -> str:
    """Who must do what about a TLS failure, as the site operator reads it."""
    pinned = f"{ca_path} (site.toml key site.federation_ca)"
    keep = "This site keeps retrying on its own; nothing needs a restart."
    p = diagnosis.problem
    if p is TlsProblem.UNKNOWN_CA:
        return (
            f"The server at {server} presents a TLS certificate not signed by the "
            f"federation CA this site pins ({diagnosis.detail}). Ask the coordinator for the "
            "federation's current CA certificate (ca/ca.pem of the federation folder, or "
            f"ca/ca-bundle.pem during a CA rotation) and save it as {pinned}. If it is "
            "the right one, check site.server in site.toml: another server may answer "
            f"there. {keep}"
        )
    if p is TlsProblem.SERVER_CERT_EXPIRED:
        return (
            f"The server at {server} presents an expired TLS certificate "
            f"({diagnosis.detail}). Nothing to change at this site: the coordinator must "
            "run `medfed server renew-cert --config server.toml` (the running server "
            f"serves the new certificate at once). {keep}"
        )
    if p is TlsProblem.PINNED_CA_EXPIRED:
        return (
            f"The federation CA this site pins has expired ({diagnosis.detail}). The "
            "coordinator must create a new one (`medfed server rotate-ca`, then "
            "`medfed server rotate-ca --finish`) and send this site ca/ca-bundle.pem; "
            f"save it as {pinned}. {keep}"
        )
    if p is TlsProblem.NOT_YET_VALID:
        return (
            f"TLS with the server at {server} failed: {diagnosis.detail}. Set this "
            f"machine's clock (NTP), or ask the coordinator to check the server's. {keep}"
        )
    if p is TlsProblem.WRONG_HOST:
        return (
            f"TLS with the server at {server} failed: {diagnosis.detail}. Set site.server "
            "in site.toml to the host name the coordinator gave (one the certificate "
            "names), then restart the site."
        )
    return (
        f"TLS with the server at {server} failed ({diagnosis.detail}). Check with the "
        f"coordinator that this is the federation's address and CA ({pinned}). {keep}"
    )
