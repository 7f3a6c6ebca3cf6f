"""Fast checks of the pieces that keep a federation up: restart back-off, TLS failures
explained, a renewed certificate served without a restart, a supervised SuperNode."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from medfed.core.errors import IdentityError, MedfedError
from medfed.core.identity import (
    CertificateAuthority,
    TlsProblem,
    diagnose_server_certificate,
    diagnose_tls,
    replace_server_identity,
    save_server_identity,
    write_ca_bundle,
)
from medfed.core.procs import Managed, RestartBackoff, free_port

NOW = dt.datetime.now(dt.timezone.utc)
_PEM = Encoding.PEM

# ------------------------------------------------------------------ back-off


def test_restart_backoff_doubles_to_its_cap_and_starts_over_after_a_stable_run() -> None:
    backoff = RestartBackoff(initial=1.0, cap=60.0, stable_after=300.0)
    delays = [backoff.delay(uptime=2.0) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff.restarts == 9
    assert backoff.delay(uptime=301.0) == 1.0  # it had been up for a while: a new streak
    assert backoff.restarts == 1
    assert backoff.delay(uptime=0.5) == 2.0


# ------------------------------------------------------------------ TLS diagnosis


@pytest.fixture(scope="module")
def cas() -> tuple[CertificateAuthority, CertificateAuthority]:
    return CertificateAuthority.create("fed"), CertificateAuthority.create("other")


def test_a_good_certificate_needs_no_explanation(cas) -> None:  # noqa: ANN001
    ca, _ = cas
    _, cert = ca.issue_server_cert(["127.0.0.1", "localhost"])
    assert diagnose_server_certificate(cert, [ca.cert], host="127.0.0.1") is None
    assert diagnose_server_certificate(cert, [ca.cert], host="localhost") is None


@pytest.mark.parametrize(
    "case, problem",
    [
        ("other CA", TlsProblem.UNKNOWN_CA),
        ("server expired", TlsProblem.SERVER_CERT_EXPIRED),
        ("pinned CA expired", TlsProblem.PINNED_CA_EXPIRED),
        ("not yet valid", TlsProblem.NOT_YET_VALID),
        ("other host", TlsProblem.WRONG_HOST),
        ("nothing there", TlsProblem.NO_CERTIFICATE),
    ],
)
def test_each_tls_failure_is_told_apart(cas, case: str, problem: TlsProblem) -> None:  # noqa: ANN001
    ca, other = cas
    now, host = NOW, "127.0.0.1"
    _, cert = ca.issue_server_cert([host])
    pinned = [ca.cert]
    if case == "other CA":
        _, cert = other.issue_server_cert([host])
    elif case == "server expired":
        _, cert = ca.issue_server_cert([host], days=1, not_before=NOW - dt.timedelta(days=3))
    elif case == "pinned CA expired":
        now = NOW + dt.timedelta(days=4000)  # after the CA's ten years (and the server's)
    elif case == "not yet valid":
        _, cert = ca.issue_server_cert([host], not_before=NOW + dt.timedelta(days=1))
    elif case == "other host":
        host = "10.1.2.3"
    elif case == "nothing there":
        cert = None
    diagnosis = diagnose_server_certificate(cert, pinned, host=host, now=now)
    assert diagnosis is not None and diagnosis.problem is problem, diagnosis
    if problem is TlsProblem.UNKNOWN_CA:
        assert "'medfed CA other'" in diagnosis.detail and "'medfed CA fed'" in diagnosis.detail


def test_a_bundle_of_both_cas_trusts_either_servers_certificate(cas) -> None:  # noqa: ANN001
    old, new = cas
    _, by_new = new.issue_server_cert(["127.0.0.1"])
    assert diagnose_server_certificate(by_new, [old.cert, new.cert], host="127.0.0.1") is None
    assert (
        diagnose_server_certificate(by_new, [old.cert], host="127.0.0.1").problem
        is TlsProblem.UNKNOWN_CA
    )


def test_the_site_is_told_who_must_do_what(cas, tmp_path: Path) -> None:  # noqa: ANN001
    from medfed.client.tls_advice import tls_advice
    from medfed.core.identity import TlsDiagnosis

    ca_path = tmp_path / "federation-ca.pem"
    advice = {
        p: tls_advice(TlsDiagnosis(p, "details"), server="h:1", ca_path=ca_path) for p in TlsProblem
    }
    assert "ca/ca.pem" in advice[TlsProblem.UNKNOWN_CA]
    assert f"{ca_path} (site.toml key site.federation_ca)" in advice[TlsProblem.UNKNOWN_CA]
    assert "medfed server renew-cert" in advice[TlsProblem.SERVER_CERT_EXPIRED]
    assert "Nothing to change at this site" in advice[TlsProblem.SERVER_CERT_EXPIRED]
    assert "rotate-ca" in advice[TlsProblem.PINNED_CA_EXPIRED]
    assert str(ca_path) in advice[TlsProblem.PINNED_CA_EXPIRED]
    for problem, text in advice.items():
        if problem is not TlsProblem.WRONG_HOST:  # a changed site.toml needs a restart
            assert "keeps retrying" in text


# ------------------------------------------------ a real TLS server on loopback


@contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[tuple[str, object]]:
    """A TLS server on 127.0.0.1 whose context follows its files, as the SuperLink's does."""
    from medfed.server.superlink_launcher import CertificateReloader

    def build() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    reloader = CertificateReloader(build, (cert, key), check_every=0.0)
    reloader.context.sni_callback = reloader.sni_callback
    port = free_port()
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)  # refused handshakes: expected

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(handle, "127.0.0.1", port, ssl=reloader.context), loop
    ).result(5)
    try:
        yield f"127.0.0.1:{port}", reloader
    finally:

        async def close() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _serial(address: str) -> int:
    host, port = address.split(":")
    pem = ssl.get_server_certificate((host, int(port)))
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def test_a_renewed_certificate_is_served_without_a_restart(cas, tmp_path: Path) -> None:  # noqa: ANN001
    ca, other = cas
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(_PEM))
    k, expired = ca.issue_server_cert(["127.0.0.1"], days=1, not_before=NOW - dt.timedelta(days=3))
    save_server_identity(k, expired, cert, key)
    with tls_server(cert, key) as (address, reloader):
        assert _serial(address) == expired.serial_number
        assert diagnose_tls(address, tmp_path / "ca.pem").problem is TlsProblem.SERVER_CERT_EXPIRED
        k, renewed = ca.issue_server_cert(["127.0.0.1"])
        replace_server_identity(k, renewed, cert, key)
        assert _serial(address) == renewed.serial_number
        assert reloader.reloads == 1
        assert diagnose_tls(address, tmp_path / "ca.pem") is None
        assert (tmp_path / "server.pem.old").exists() and key.stat().st_mode & 0o077 == 0
        # a key that does not match (caught half replaced): the last good one is served
        key.write_bytes(b"not a key")
        assert _serial(address) == renewed.serial_number


def test_grpc_and_https_clients_accept_a_bundle_of_two_cas(cas, tmp_path: Path) -> None:  # noqa: ANN001
    import httpx

    old, new = cas
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    k, c = new.issue_server_cert(["127.0.0.1"])
    save_server_identity(k, c, cert, key)
    write_ca_bundle(tmp_path / "bundle.pem", old.cert, new.cert)
    write_ca_bundle(tmp_path / "old.pem", old.cert)
    with tls_server(cert, key) as (address, _):
        for pinned, ok in (("bundle.pem", True), ("old.pem", False)):
            with httpx.Client(verify=str(tmp_path / pinned)) as client:
                try:
                    client.get(f"https://{address}/")
                except httpx.ConnectError as exc:
                    assert not ok and "CERTIFICATE_VERIFY_FAILED" in str(exc)
                except httpx.HTTPError:
                    assert ok  # the handshake passed (the toy server then hangs up)


@pytest.mark.parametrize(
    "presented, phrase",
    [("other CA", "Another federation's server"), ("expired", "medfed server renew-cert")],
)
def test_the_coordinator_gets_a_message_not_a_raw_tls_error(
    cas, tmp_path: Path, presented: str, phrase: str
) -> None:  # noqa: ANN001
    from medfed.server.control import Control

    ca, other = cas
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    if presented == "other CA":
        k, c = other.issue_server_cert(["127.0.0.1"])
    else:
        k, c = ca.issue_server_cert(["127.0.0.1"], days=1, not_before=NOW - dt.timedelta(days=3))
    save_server_identity(k, c, cert, key)
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(_PEM))
    with tls_server(cert, key) as (address, _), Control(address, tmp_path / "ca.pem") as control:
        with pytest.raises(MedfedError) as err:
            control.nodes()
    text = err.value.render()
    assert phrase in text and "list sites" in text
    assert "CERTIFICATE_VERIFY_FAILED" not in text and "httpx" not in text


# ------------------------------------------------------------------ supervision


def _fake_daemon(short_tmp: Path, server: str = "127.0.0.1:9"):  # noqa: ANN202
    from medfed.client.daemon import SiteDaemon
    from medfed.client.site import init_site

    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    config = init_site(
        short_tmp / "s",
        name="s",
        federation_ca=short_tmp / "ca.pem",
        server=server,
        runtime_port=free_port(),
    )
    daemon = SiteDaemon(config)
    daemon.supervision.backoff = RestartBackoff(initial=0.05, cap=0.2)
    return daemon


def _supervise(daemon, scripts: list[str], short_tmp: Path, until) -> list[int]:  # noqa: ANN001
    """Run ``daemon.wait`` over fake SuperNodes (one Python script per start)."""
    starts: list[int] = []

    def supernode() -> Managed:
        starts.append(len(starts))
        code = scripts[min(len(starts), len(scripts)) - 1]
        return Managed("fake SuperNode", [sys.executable, "-c", code], short_tmp / "sn.log")

    daemon.supernode_process = supernode
    daemon.supernode = daemon.supernode_process().start()
    stop = threading.Event()
    waiting = threading.Thread(target=daemon.wait, kwargs={"stop": stop})
    waiting.start()
    try:
        deadline = time.monotonic() + 30
        while not until(starts):
            assert waiting.is_alive(), "the daemon gave up"
            assert time.monotonic() < deadline, "the SuperNode was not restarted"
            time.sleep(0.05)
    finally:
        stop.set()
        waiting.join(timeout=10)
        daemon.supernode.stop()
    return starts


def test_a_killed_supernode_is_restarted_with_backoff(short_tmp: Path, caplog) -> None:  # noqa: ANN001
    daemon = _fake_daemon(short_tmp)
    kill = "import os, signal; print('SuperNode ID: 42', flush=True); os.kill(os.getpid(), 9)"
    live = "import time; print('SuperNode ID: 42', flush=True); time.sleep(60)"
    with caplog.at_level(logging.WARNING, logger="medfed.site"):
        starts = _supervise(
            daemon,
            [kill, kill, kill, live],
            short_tmp,
            until=lambda s: len(s) == 4 and daemon.supernode.alive(),
        )
    assert len(starts) == 4
    restarts = [
        r.getMessage() for r in caplog.records if "restarting the SuperNode" in r.getMessage()
    ]
    assert len(restarts) == 3 and "killed (signal 9)" in restarts[0]
    assert "restart 3 in a row" in restarts[2]


def test_a_tls_failure_is_explained_once_and_retried(short_tmp: Path, caplog) -> None:  # noqa: ANN001
    other = CertificateAuthority.create("other")
    cert, key = short_tmp / "server.pem", short_tmp / "server.key"
    k, c = other.issue_server_cert(["127.0.0.1"])
    save_server_identity(k, c, cert, key)
    with tls_server(cert, key) as (address, _):
        daemon = _fake_daemon(short_tmp, server=address)
        tls = (
            "print('Exit Code: 305'); print('Failed to initialize the connection to the "
            "SuperLink.'); print('[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: unable to get local issuer certificate'); raise SystemExit(1)"
        )
        with caplog.at_level(logging.WARNING, logger="medfed.site"):
            _supervise(daemon, [tls], short_tmp, until=lambda s: len(s) >= 4)
    told = [r.getMessage() for r in caplog.records if "Ask the coordinator" in r.getMessage()]
    assert len(told) == 1, told
    assert "'medfed CA other'" in told[0] and "site.federation_ca" in told[0]


def test_a_key_the_supernode_cannot_load_stops_the_daemon(short_tmp: Path) -> None:
    daemon = _fake_daemon(short_tmp)
    daemon.supernode_process = lambda: Managed(  # type: ignore[method-assign]
        "fake",
        [sys.executable, "-c", "print('Exit Code: 302'); raise SystemExit(1)"],
        short_tmp / "sn.log",
    )
    daemon.supernode = daemon.supernode_process().start()
    with pytest.raises(IdentityError, match="private key"):
        daemon.wait()


def test_the_executor_survives_a_lost_supernode(monkeypatch: pytest.MonkeyPatch) -> None:
    from medfed.client.executor import InProcessExecutor

    calls: list[int] = []

    def flaky(self) -> None:  # noqa: ANN001
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("push to a SuperNode that is gone")
        self._stop.wait(30)

    monkeypatch.setattr(InProcessExecutor, "_poll", flaky)
    executor = InProcessExecutor("127.0.0.1:9", app=None)  # type: ignore[arg-type]
    executor.start()
    deadline = time.monotonic() + 10
    while len(calls) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert executor._thread is not None and executor._thread.is_alive()
    executor.stop()


# ------------------------------------------------------------------ CA rotation


def test_a_ca_rotation_keeps_both_cas_trusted_and_ends_with_the_new_one(tmp_path: Path) -> None:
    from medfed.core.identity import load_certificate, load_certificates
    from medfed.server.federation import (
        CaFiles,
        Federation,
        begin_ca_rotation,
        finish_ca_rotation,
        init_federation,
        server_trust_file,
    )
    from medfed.server.superlink import check_tls

    fed = Federation.load(
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1", "localhost"], port=9999)
    )
    files, tls = CaFiles.of(fed), fed.config.tls
    old_ca = load_certificate(fed.ca_cert)
    old_server = load_certificate(fed.path(tls.cert))
    assert load_certificates(server_trust_file(fed)) == [old_ca]
    bundle = begin_ca_rotation(fed)
    new_ca = load_certificate(files.next_cert)
    assert load_certificates(bundle) == [old_ca, new_ca]
    assert load_certificate(fed.path(tls.cert)) == old_server  # nothing served changes yet
    assert load_certificates(server_trust_file(fed)) == [old_ca, new_ca]
    with pytest.raises(IdentityError, match="already under way"):
        begin_ca_rotation(fed)
    finish_ca_rotation(fed)
    assert load_certificate(fed.ca_cert) == new_ca and not files.next_cert.exists()
    assert load_certificate(files.old_cert) == old_ca and files.old_key.exists()
    assert set(load_certificates(files.bundle)) == {old_ca, new_ca}
    new_server = load_certificate(fed.path(tls.cert))
    assert diagnose_server_certificate(new_server, [new_ca], host="localhost") is None
    assert (
        diagnose_server_certificate(new_server, [old_ca], host="localhost").problem
        is TlsProblem.UNKNOWN_CA
    )
    check_tls(fed)  # `medfed server start` accepts the result
    ca = CertificateAuthority.load(fed.ca_cert, fed.path(tls.ca_key))
    assert ca.key.public_key() == ca.cert.public_key()  # the key is the new CA's
    with pytest.raises(IdentityError, match="No CA rotation"):
        finish_ca_rotation(fed)


def test_sites_and_enrol_say_who_answers_when_the_server_has_another_certificate(
    cas, tmp_path: Path
) -> None:  # noqa: ANN001
    import subprocess

    from medfed.core.identity import SiteKeys
    from medfed.server.federation import init_federation

    _, other = cas
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    k, c = other.issue_server_cert(["127.0.0.1"])
    save_server_identity(k, c, cert, key)
    SiteKeys.create().save(tmp_path / "site.key", tmp_path / "site.pub")
    with tls_server(cert, key) as (address, _):
        config = init_federation(
            tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=int(address.rsplit(":", 1)[1])
        )
        outputs = [
            subprocess.run(
                [sys.executable, "-m", "medfed", "server", *args, "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            for args in (["enrol", str(tmp_path / "site.pub"), "--name", "a"], ["sites"])
        ]
    for out in outputs:
        assert out.returncode == 0, out.stderr
        text = " ".join(out.stdout.split())  # undo the console's wrapping
        assert "'medfed CA other'" in text and "Another federation's server" in text, text
        assert "medfed server start" in text and "server.toml" in text
        assert "Traceback" not in out.stderr and "CERTIFICATE_VERIFY_FAILED" not in text
    assert "not registered with the running server" in outputs[0].stdout
    assert "unknown (see above)" in outputs[1].stdout


def test_the_server_starts_a_superlink_that_stopped_again_and_stops_the_last_one(
    short_tmp: Path,
) -> None:
    from medfed.server.superlink import keep_running

    def proc(name: str, code: str) -> Managed:
        return Managed(name, [sys.executable, "-c", code], short_tmp / f"{name}.log")

    crashed = proc("crashing", "print('boom', flush=True); raise SystemExit(3)").start()
    spare_kept: list[str] = []
    crashed.on_stop = lambda: spare_kept.append("stopped")  # the spare pool's stop
    restarted: list[Managed] = []
    stop, reports = threading.Event(), []

    def restart() -> Managed:
        restarted.append(proc("restarted", "import time; time.sleep(60)").start())
        stop.set()
        return restarted[-1]

    keep_running(crashed, restart, report=reports.append, stop=stop, poll=0.05)
    assert len(restarted) == 1 and "exit 3" in reports[0] and "boom" in reports[0]
    assert spare_kept == []  # the dead SuperLink's stop left the spare alone
    assert restarted[0].proc.poll() is not None  # the running one was stopped at the end
