"""`medfed server start`: Flower's SuperLink with TLS, node authentication, persistent state."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from medfed.core.errors import MedfedError, ProcessError
from medfed.core.flower_env import flower_env
from medfed.core.identity import check_certificate_valid, check_issued_by, load_certificate
from medfed.core.procs import Managed, RestartBackoff, require_free_port, wait_for_port
from medfed.server.app import REVOCATIONS_ENV, RUNS_DIR_ENV, SITES_FILE_ENV
from medfed.server.control import Control
from medfed.server.coordinators import AUDIT_ENV, REGISTRY_ENV, SOURCES_ENV
from medfed.server.federation import Federation, server_trust_file
from medfed.server.resume import ResumeOutcome, resume_unfinished
from medfed.server.serverapp_spare import SPARES_ENV, spare_pool

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
        raise MedfedError(
            "The server's TLS key is missing.",
            where=str(fed.path(tls.key)),
            fix="restore it from backup or re-create the federation",
        )


def superlink_process(fed: Federation) -> Managed:
    """The SuperLink as a managed process (not started yet)."""
    tls, state, link = fed.config.tls, fed.config.state, fed.config.superlink
    db = fed.path(state.database)
    db.parent.mkdir(parents=True, exist_ok=True)
    fed.runs_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "medfed.server.superlink_launcher",
        "--ssl-ca-certfile",
        str(server_trust_file(fed)),  # the CA, + the next in a rotation
        "--ssl-certfile",
        str(fed.path(tls.cert)),
        "--ssl-keyfile",
        str(fed.path(tls.key)),
        "--enable-supernode-auth",
        "--database",
        str(db),
        "--disable-runtime-dependency-installation",
        "--host",
        link.host,
        "--port",
        str(link.port),
    ]
    env = {
        **flower_env(db.parent / "flwr_home"),
        RUNS_DIR_ENV: str(fed.runs_dir),
        SITES_FILE_ENV: str(fed.sites_file),  # read by each run (enrolments go on)
        REVOCATIONS_ENV: str(fed.revocations_file),
        SPARES_ENV: str(spares_folder(fed)),
        # only the registry's coordinators pass the Control API (server/coordinators.py)
        REGISTRY_ENV: str(fed.coordinators.path),
        SOURCES_ENV: json.dumps(link.control_from),  # from where, too
        AUDIT_ENV: str(fed.path(state.control_audit_log)),
    }
    return Managed("SuperLink", argv, fed.path(state.log_file), env=env)


def spares_folder(fed: Federation) -> Path:
    """Where the warm spare ServerApps listen (:mod:`medfed.server.serverapp_spare`)."""
    return fed.path(fed.config.state.database).parent / "spares"


def start_superlink(
    fed: Federation,
    *,
    timeout: float = 60.0,
    resume: bool = True,
    on_resumed: Callable[[ResumeOutcome], None] | None = None,
) -> Managed:
    """Check TLS and the port, start the SuperLink, wait until it serves, enrol known sites.

    This process keeps a warm spare ServerApp for the SuperLink's runs, which outlives
    a SuperLink crash (:mod:`medfed.server.serverapp_spare`); stopping the returned
    process stops it. Then every run the server lost in a crash is resumed (or, with
    ``resume`` off, ended as failed); ``on_resumed`` hears what happened to each
    (:mod:`medfed.server.resume`).
    """
    check_tls(fed)
    if fed.ensure_coordinator():
        log.warning(
            "this federation had no coordinator registry: made %s with the "
            "credential %s; the Control API now takes only registered coordinators",
            fed.coordinators.path,
            fed.config.coordinator.credential,
        )
    link = fed.config.superlink
    require_free_port(
        link.host, link.port, what="SuperLink", key=f"{fed.config_path} key superlink.port"
    )
    proc = superlink_process(fed)
    try:  # a warm ServerApp for the first run (a resumed one, say): this process keeps one
        pool = spare_pool(spares_folder(fed), proc.env, proc.log_path)
        proc.on_stop = pool.stop
    except OSError as exc:
        log.warning("runs start without a warm ServerApp: %s", exc)
        proc.env.pop(SPARES_ENV)
    proc.start()
    if not wait_for_port(link.host, link.port, timeout=timeout, alive=proc.alive):
        tail = proc.log_tail()
        proc.stop()
        raise ProcessError(
            "The SuperLink did not start.",
            where=str(proc.log_path),
            fix="read its log; last lines:\n" + tail,
        )
    try:
        sync_enrolment(fed)
        with Control(link.address, fed.ca_cert, fed.credential()) as control:
            for outcome in resume_unfinished(control, fed.runs_dir, resume=resume):
                if on_resumed is not None:
                    on_resumed(outcome)
    except BaseException:
        proc.stop()
        raise
    return proc


def keep_running(
    proc: Managed,
    restart: Callable[[], Managed],
    *,
    report: Callable[[str], None],
    stop: threading.Event | None = None,
    poll: float = 0.5,
) -> None:
    """Start the SuperLink ``proc`` again, with ``restart``, whenever it stops.

    Waits a back-off first (1 s doubling to 60 s while it keeps failing); ``restart``
    (:func:`start_superlink`) resumes its runs, and the warm spare ServerApp this
    process keeps, which a dead SuperLink leaves alone, takes the first at once.
    Until ``stop`` is set (or an interrupt); then the SuperLink of the moment is stopped.
    """
    stop = stop or threading.Event()
    backoff = RestartBackoff()
    try:
        while not stop.wait(poll):
            if proc.alive():
                continue
            delay = backoff.delay(proc.uptime())
            code = proc.proc.returncode if proc.proc is not None else None
            report(
                f"the SuperLink stopped (exit {code}); starting it again in {delay:.0f} s; "
                f"last log lines:\n{proc.log_tail()}"
            )
            proc.on_stop = None  # closes its log; the spare stays for the next SuperLink
            proc.stop()
            if stop.wait(delay):
                break
            proc = restart()
    finally:
        proc.stop()


def sync_enrolment(fed: Federation) -> int:
    """Register every enrolled site's key with the SuperLink (already-known keys are skipped)."""
    sites = fed.enrolled()
    if not sites:
        return 0
    with Control(fed.config.superlink.address, fed.ca_cert, fed.credential()) as control:
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
