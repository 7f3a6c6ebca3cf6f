"""`medfed server start`: Flower's SuperLink with TLS, node authentication, persistent state."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from medfed.core.errors import MedfedError, ProcessError
from medfed.core.flower_env import flower_env
from medfed.core.identity import check_certificate_valid, check_issued_by, load_certificate
from medfed.core.procs import Managed, require_free_port, wait_for_port
from medfed.server.app import RUNS_DIR_ENV
from medfed.server.control import Control
from medfed.server.federation import Federation, server_trust_file
from medfed.server.resume import ResumeOutcome, resume_unfinished

log = logging.getLogger("medfed.server")


def check_tls(fed: Federation) -> None:
    """Fail before starting if the server certificate is missing, expired or not from the CA."""
    tls = fed.config.tls
    ca = load_certificate(fed.path(tls.ca_cert))
    cert = load_certificate(fed.path(tls.cert))
    where = f"{fed.path(tls.cert)} (server.toml key tls.cert)"
    check_certificate_valid(cert, where=where)
    check_issued_by(cert, ca, where=where)
    if not fed.path(tls.key).exists():
        raise MedfedError("The server's TLS key is missing.", where=str(fed.path(tls.key)),
                          fix="restore it from backup or re-create the federation")


def superlink_process(fed: Federation) -> Managed:
    """The SuperLink as a managed process (not started yet)."""
    tls, state, link = fed.config.tls, fed.config.state, fed.config.superlink
    db = fed.path(state.database)
    db.parent.mkdir(parents=True, exist_ok=True)
    fed.runs_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "medfed.server.superlink_launcher",
        "--ssl-ca-certfile", str(server_trust_file(fed)),  # the CA, + the next in a rotation
        "--ssl-certfile", str(fed.path(tls.cert)),
        "--ssl-keyfile", str(fed.path(tls.key)),
        "--enable-supernode-auth",
        "--database", str(db),
        "--disable-runtime-dependency-installation",
        "--host", link.host, "--port", str(link.port),
    ]
    env = {**flower_env(db.parent / "flwr_home"), RUNS_DIR_ENV: str(fed.runs_dir)}
    return Managed("SuperLink", argv, fed.path(state.log_file), env=env)


def start_superlink(fed: Federation, *, timeout: float = 60.0, resume: bool = True,
                    on_resumed: Callable[[ResumeOutcome], None] | None = None) -> Managed:
    """Check TLS and the port, start the SuperLink, wait until it serves, enrol known sites.

    Then every run the server lost in a crash is resumed (or, with ``resume`` off, ended
    as failed); ``on_resumed`` hears what happened to each (:mod:`medfed.server.resume`).
    """
    check_tls(fed)
    link = fed.config.superlink
    require_free_port(link.host, link.port, what="SuperLink",
                      key=f"{fed.config_path} key superlink.port")
    proc = superlink_process(fed).start()
    if not wait_for_port(link.host, link.port, timeout=timeout, alive=proc.alive):
        tail = proc.log_tail()
        proc.stop()
        raise ProcessError(
            "The SuperLink did not start.", where=str(proc.log_path),
            fix="read its log; last lines:\n" + tail,
        )
    try:
        sync_enrolment(fed)
        with Control(link.address, fed.ca_cert) as control:
            for outcome in resume_unfinished(control, fed.runs_dir, resume=resume):
                if on_resumed is not None:
                    on_resumed(outcome)
    except BaseException:
        proc.stop()
        raise
    return proc


def sync_enrolment(fed: Federation) -> int:
    """Register every enrolled site's key with the SuperLink (already-known keys are skipped)."""
    sites = fed.enrolled()
    if not sites:
        return 0
    with Control(fed.config.superlink.address, fed.ca_cert) as control:
        known = {bytes(n["public_key"]).strip() for n in control.nodes()}
        added = 0
        for site in sites:
            pem = site["public_key"].encode()
            if pem.strip() in known:
                continue
            control.register_node(pem, site["name"])
            added += 1
    log.info("registered %d enrolled site(s) with the SuperLink", added)
    return added


def superlink_log(fed: Federation) -> Path:
    """Where the SuperLink logs."""
    return fed.path(fed.config.state.log_file)
