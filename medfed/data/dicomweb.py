"""A PACS over DICOMweb as a site's data source: the matched series mirrored into the cache.

``medfed site scan`` (and a site's first training, when nothing was fetched yet)
searches the PACS with QIDO-RS for the series that ``[data.pacs.query]`` matches,
plus the DICOM SEG series of the same studies (labels), and fetches with WADO-RS
only what the cache does not hold yet: a new series, or the new instances of a
grown one. Each instance is written to a temporary file and renamed; a series is
fetched into ``<cache>/pacs/.partial/`` and moved into ``<cache>/pacs/`` only when
complete, so a PACS that goes away mid-fetch leaves the cache consistent and the
next scan continues where it stopped. The mirror is then read like any DICOM
folder (:class:`medfed.data.DicomFolderSource`): decoded once, labels from SEG or
the manifest. A series the query no longer matches is removed from the mirror; a
query that matches nothing at all while the mirror holds series is refused, and the
mirror kept (a PACS that lost its index or a mistyped query must not empty it).

Only GET requests are sent (search and retrieve): nothing is ever written to the PACS.
Credentials come from a file (mode 600) or the environment, never from site.toml;
a password or token is never sent in clear to another host than this one.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import tomllib

from medfed.core.config import DataSourceConfig, PacsSection
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.files import atomic_write, sync_filesystem
from medfed.data.cache import uid_key

MIRROR_DIRNAME = "pacs"
STATE_FILE = ".sync.json"  # hidden: the folder reader skips it
ENV_PREFIX = "MEDFED_PACS_"
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_COUNT = "00201209"
#: Fetched series are made durable and moved in by this many at a time (one syncfs each).
MOVE_IN_EVERY = 16
#: Instances as the PACS stores them: a PACS asked to transcode may fail (Orthanc answers
#: HTTP 500 for JPEG 2000 it cannot decode); pydicom's plugins decode them here.
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_SERIES_DESCRIPTION, _STUDY_DESCRIPTION = "0008103E", "00081030"


@dataclass
class PacsFetch:
    """What one sync found and did, in counts (no identifiers)."""

    matched_series: int = 0
    matched_instances: int = 0
    label_series: int = 0
    fetched_series: int = 0
    fetched_instances: int = 0
    fetched_bytes: int = 0
    cached_series: int = 0
    removed_series: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def render_lines(self) -> list[str]:
        """Lines for `medfed site scan`."""
        lines = [
            f"PACS: the query matched {self.matched_series} series "
            f"({self.matched_instances} instances) and {self.label_series} SEG series",
            f"  fetched {self.fetched_series} series ({self.fetched_instances} instances, "
            f"{self.fetched_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s; "
            f"{self.cached_series} already in the cache",
        ]
        if self.removed_series:
            lines.append(
                f"  {self.removed_series} series no longer matched: removed from the cache"
            )
        lines += [f"  {n:5d}  skipped: {reason}" for reason, n in self.skipped.items()]
        if not self.matched_series:
            lines.append("  the query matched nothing: check [data.pacs.query] in site.toml")
        return lines


# ----------------------------------------------------------------------------- connection


def pacs_client(pacs: PacsSection, *, where: str = "[data.pacs]") -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the PACS, with its credentials and TLS."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    class Session(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            settings = super().merge_environment_settings(*args, **kwargs)
            if pacs.ca_bundle:  # REQUESTS_CA_BUNDLE would win over it (psf/requests#3829)
                settings["verify"] = pacs.ca_bundle
            return settings

    url = _checked_url(pacs.url, where)
    session = Session()
    secret = _credentials(pacs, where)
    if "token" in secret:
        session.headers["Authorization"] = f"Bearer {secret['token']}"
    elif secret:
        session.auth = (secret["username"], secret["password"])
    if secret and urlsplit(url).scheme == "http" and not _loopback(urlsplit(url).hostname):
        raise ConfigError(
            "The PACS's credentials would travel in clear over http.",
            where=f"{where} url = {pacs.url!r}",
            expected="an https:// URL (or a PACS on this machine)",
            fix="use the PACS's https:// DICOMweb URL (add ca_bundle for a hospital CA)",
        )
    session.verify = pacs.ca_bundle or True  # verification is never turned off
    if pacs.client_cert:
        session.cert = (pacs.client_cert, pacs.client_key) if pacs.client_key else pacs.client_cert
    adapter = requests.adapters.HTTPAdapter(max_retries=stale_connection_retry())
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    client = DICOMwebClient(url, session=session, timeout=pacs.timeout_s)
    client.set_http_retry_params(retry=False)  # a failure is reported, the next scan resumes
    return client


def stale_connection_retry() -> Any:
    """urllib3's retry policy of a PACS session: a GET or HEAD cut off unanswered is sent once more.

    A PACS, or the hospital's proxy in front of it, may close an idle kept-alive
    connection just as the next request goes out on it; the client then reads no
    response at all ("Remote end closed connection without response"). Browsers and
    HTTP libraries send such an idempotent request again on a new connection. Every
    other failure (a timeout, TLS, an HTTP error status, a cut-off POST) is raised at
    once, as without retries: the scan reports it and the next scan resumes.
    """
    from urllib3.exceptions import ProtocolError
    from urllib3.util.retry import Retry

    class StaleConnectionRetry(Retry):
        def increment(
            self,
            method: str | None = None,
            url: str | None = None,
            response: Any = None,
            error: Exception | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Retry:
            if not isinstance(error, ProtocolError):  # what requests' Retry(0, read=False) does
                return Retry.increment(
                    self.new(total=0, read=False), method, url, response, error, *args, **kwargs
                )
            return super().increment(method, url, response, error, *args, **kwargs)

    return StaleConnectionRetry(
        total=1,
        connect=0,
        read=1,
        redirect=False,
        status=0,
        other=0,
        allowed_methods=frozenset({"GET", "HEAD"}),
        respect_retry_after_header=False,
        raise_on_status=False,
    )


def _checked_url(url: str, where: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"The PACS URL {url!r} is not an http(s) URL.",
            where=f"{where} url",
            expected="https://host[:port]/dicom-web",
            fix="set url to the PACS's DICOMweb root",
        )
    if parts.username or parts.password:
        raise ConfigError(
            "The PACS URL carries credentials; site.toml must not.",
            where=f"{where} url",
            expected="a URL without user:password@",
            fix="move them to the credentials file (mode 600) or to "
            f"{ENV_PREFIX}USERNAME / {ENV_PREFIX}PASSWORD",
        )
    return url.rstrip("/")


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _credentials(pacs: PacsSection, where: str) -> dict[str, str]:
    """``{username, password}`` or ``{token}`` from the file or the environment; ``{}``: none."""
    if pacs.credentials:
        path = Path(pacs.credentials)
        key = f"{where} credentials = {pacs.credentials!r}"
        try:
            mode = path.stat().st_mode
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                "The PACS credentials file does not exist.",
                where=key,
                fix="create it with username and password (or token)",
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(
                f"The PACS credentials file cannot be read: {exc}",
                where=key,
                expected='username = "..."\npassword = "..."',
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                "The PACS credentials file is readable by other users.",
                where=key,
                expected="mode 600 (owner only)",
                fix=f"chmod 600 {path}",
            )
        found = {k: str(v) for k, v in data.items() if k in ("username", "password", "token")}
        source = key
    else:
        found = {
            k: os.environ[ENV_PREFIX + k.upper()]
            for k in ("username", "password", "token")
            if os.environ.get(ENV_PREFIX + k.upper())
        }
        source = f"the environment ({ENV_PREFIX}USERNAME/PASSWORD or {ENV_PREFIX}TOKEN)"
    if "token" in found:
        return {"token": found["token"]}
    if found and set(found) != {"username", "password"}:
        raise ConfigError(
            "The PACS credentials are incomplete.",
            where=source,
            expected="both username and password, or a token",
            fix="add the missing one",
        )
    return found


@contextmanager
def pacs_errors(url: str, doing: str) -> Iterator[None]:
    """Turn what requests raises into an error that names the PACS, the cause and the fix."""
    import requests

    try:
        yield
    except requests.exceptions.SSLError as exc:
        said = str(exc).upper()
        if "CERTIFICATE_REQUIRED" in said:  # TLS 1.3 alert 116: mutual TLS, no certificate
            raise _no_client_certificate(url, doing) from exc
        if "ALERT_UNKNOWN_CA" in said or "ALERT_BAD_CERTIFICATE" in said:
            raise MedfedError(
                f"TLS with the PACS failed while {doing}: it refused the site's client certificate",
                where=url,
                expected="a client certificate issued by the CA the PACS (or its proxy) trusts",
                fix="check [data.pacs] client_cert and client_key with the hospital's PKI "
                "(issuer, expiry)",
            ) from exc
        raise MedfedError(
            f"TLS with the PACS failed while {doing}: its certificate is not trusted or does "
            "not name this host",
            where=url,
            expected="a certificate signed by ca_bundle (or a system CA) for the URL's host name",
            fix="set [data.pacs] ca_bundle to the hospital CA's PEM file, or correct the URL's "
            "host name",
        ) from exc
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code == 400 and "ssl certificate" in exc.response.text[:4000].lower():
            raise _no_client_certificate(url, doing) from exc  # nginx's ssl_verify_client
        if code in (401, 403):
            raise MedfedError(
                f"the PACS refused the credentials (HTTP {code}) while {doing}",
                where=url,
                fix="check the credentials file or MEDFED_PACS_* "
                "variables, and the account's rights",
            ) from exc
        raise MedfedError(
            f"the PACS answered HTTP {code} while {doing}",
            where=url,
            expected="a DICOMweb server (QIDO-RS and WADO-RS)",
            fix="check the URL (the DICOMweb root, e.g. .../dicom-web)",
        ) from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise MedfedError(
            f"cannot reach the PACS while {doing}",
            where=url,
            fix="check that it runs and that this machine may reach it; "
            "what was fetched is kept and the next scan continues",
        ) from exc


def _no_client_certificate(url: str, doing: str) -> MedfedError:
    return MedfedError(
        f"TLS with the PACS failed while {doing}: it asks for a client certificate "
        "(mutual TLS) and the site sent none",
        where=url,
        expected="[data.pacs] client_cert and client_key: the site's certificate from the "
        "CA the PACS (or its proxy) trusts",
        fix="set [data.pacs] client_cert and client_key to the PEM files the hospital's "
        "PKI issued for this site",
    )


# ----------------------------------------------------------------------------- mirror


class PacsMirror:
    """The matched series of the PACS, as complete DICOM series under ``<cache_dir>/pacs``."""

    def __init__(self, source: DataSourceConfig) -> None:
        if source.pacs is None:
            raise MedfedError("no [data.pacs] section", where="site.toml [data]")
        self.source = source
        self.pacs = source.pacs
        self.folder = Path(source.cache_dir) / MIRROR_DIRNAME
        self.staging = self.folder / ".partial"

    def folder_source(self) -> DataSourceConfig:
        """The mirror as a ``dicom-folder`` source (decoded series in ``<cache>/decoded``)."""
        return self.source.model_copy(
            update={
                "kind": "dicom-folder",
                "path": str(self.folder),
                "pacs": None,
                "cache_dir": str(self.folder.parent / "decoded"),
            }
        )

    def synced(self) -> bool:
        """Whether a sync ever completed (its state file is there)."""
        return (self.folder / STATE_FILE).is_file()

    def sync(self, client: Any = None) -> PacsFetch:
        """Search the PACS and fetch what is new; see the module's docstring."""
        with self._locked():
            return self._sync(client)

    def ensure_synced(self) -> None:
        """Sync unless one completed.

        One process syncs while the others wait: a site's training and evaluation may
        both find the mirror empty at once.
        """
        with self._locked():
            if not self.synced():
                self._sync(None)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _sync(self, client: Any) -> PacsFetch:
        started = time.perf_counter()
        client = client or pacs_client(self.pacs)
        fetch = PacsFetch()
        with pacs_errors(self.pacs.url, "searching (QIDO-RS)"):
            images = self._search(client)
            labels = self._labels(client, images)
        fetch.matched_series = len(images)
        cached = [d for d in self.folder.glob("s-*") if d.is_dir()]
        if not images and cached:
            # A PACS that lost its index, a query edited by mistake: emptying the cache
            # would lose every fetch. Refused, as a PACS that cannot be reached is: the
            # site goes on with its last completed scan; the operator decides.
            raise MedfedError(
                f"The query matched no series at the PACS, and the cache holds "
                f"{len(cached)}: nothing was removed; the site goes on with the series of "
                "its last completed scan.",
                where=f"{self.pacs.url} ([data.pacs.query])",
                expected="the query to match at least one series",
                fix="check [data.pacs.query] and that the PACS lists the series; to "
                f"empty the cache on purpose, delete {self.folder}",
            )
        fetch.matched_instances = sum(s["count"] or 0 for s in images)
        fetch.label_series = len(labels)
        skipped: Counter[str] = Counter()  # the folder exists: made by _locked
        wanted = set()
        staged: list[str] = []  # complete series waiting to be made durable and moved in
        try:
            for series in images + labels:
                name = _series_dir(series["series"])
                wanted.add(name)
                with pacs_errors(
                    self.pacs.url,
                    f"fetching series {fetch.fetched_series + 1} "
                    f"(WADO-RS; {fetch.fetched_series} done)",
                ):
                    got = self._fetch(client, series, skipped)
                if got is None:
                    fetch.cached_series += 1
                    continue
                fetch.fetched_series += 1
                fetch.fetched_instances += got[0]
                fetch.fetched_bytes += got[1]
                staged.append(name)
                if len(staged) >= MOVE_IN_EVERY:
                    self._move_in(staged)
        finally:  # what was fetched whole counts, even when the PACS went away after it
            self._move_in(staged)
        for stale in self.folder.glob("s-*"):
            if stale.is_dir() and stale.name not in wanted:
                shutil.rmtree(stale)
                fetch.removed_series += 1
        fetch.skipped = dict(skipped.most_common())
        fetch.seconds = time.perf_counter() - started
        atomic_write(
            self.folder / STATE_FILE,
            json.dumps(
                {"synced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **asdict(fetch)},
                indent=2,
            ).encode(),
        )
        return fetch

    def _search(self, client: Any) -> list[dict[str, Any]]:
        """The matched image series.

        Modality, dates and study UIDs are QIDO-RS filters; descriptions are matched here
        (``*``/``?`` wildcards, any case), because PACS differ on wildcard, case and space
        handling in query strings (Orthanc 1.10 matches nothing for an encoded space or ``*``).
        """
        q = self.pacs.query
        filters = {"Modality": q.modality} if q.modality else {}
        if q.date_from or q.date_to:
            filters["StudyDate"] = f"{q.date_from}-{q.date_to}"
        fields = [
            "NumberOfSeriesRelatedInstances",
            "Modality",
            "SeriesDescription",
            "StudyDescription",
        ]
        found = []
        for study in q.study_uids or [None]:
            found += client.search_for_series(
                study_instance_uid=study, search_filters=filters, fields=fields, get_remaining=True
            )
        wanted = (
            (_SERIES_DESCRIPTION, q.series_description),
            (_STUDY_DESCRIPTION, q.study_description),
        )
        return _unique(
            _series_of(r)
            for r in found
            if all(_matches(_value(r, tag), pattern) for tag, pattern in wanted)
        )

    def _labels(self, client: Any, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The SEG series in the matched studies that the query itself did not match."""
        have = {s["series"] for s in images}
        segs = []
        for study in sorted({s["study"] for s in images}):
            segs += client.search_for_series(
                study_instance_uid=study,
                search_filters={"Modality": "SEG"},
                fields=["NumberOfSeriesRelatedInstances"],
                get_remaining=True,
            )
        return [s for s in _unique(_series_of(r) for r in segs) if s["series"] not in have]

    def _fetch(
        self, client: Any, series: dict[str, Any], skipped: Counter[str]
    ) -> tuple[int, int] | None:
        """Fetch what the cache lacks of one series; ``None`` when it was complete."""
        name = _series_dir(series["series"])
        final, partial = self.folder / name, self.staging / name
        if final.is_dir():
            held = sum(1 for _ in final.glob("*.dcm"))
            if series["count"] is not None and held >= series["count"]:
                return None
            partial.parent.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
            os.replace(final, partial)  # reopened: grown on the PACS
        partial.mkdir(parents=True, exist_ok=True)
        have = _staged_sop_uids(partial, skipped)
        base = f"{self.pacs.url.rstrip('/')}/studies/{series['study']}/series/{series['series']}"
        if have:  # resume: only the instances not fetched yet
            listed = client.search_for_instances(
                study_instance_uid=series["study"],
                series_instance_uid=series["series"],
                fields=["SOPInstanceUID"],
                get_remaining=True,
            )
            todo = [r[_SOP]["Value"][0] for r in listed if _SOP in r]
            parts = (
                part
                for sop in todo
                if sop not in have
                for part in _retrieve(client, f"{base}/instances/{sop}")
            )
        else:
            parts = _retrieve(client, base)
        count = size = 0
        number = max((int(p.stem) for p in partial.glob("*.dcm") if p.stem.isdigit()), default=0)
        for part in parts:
            # Files are numbered as they come: the SOP UIDs are read back only to resume.
            file = _part10(part)
            number += 1
            _write_staged(partial / f"{number:06d}.dcm", file)
            size += len(file)
            count += 1
        return count, size

    def _move_in(self, staged: list[str]) -> None:
        """Make the staged series durable (one syncfs for all), then move them in."""
        if not staged:
            return
        sync_filesystem(self.staging)  # on disk before they count as complete
        for name in staged:
            os.replace(self.staging / name, self.folder / name)
        staged.clear()


def _retrieve(client: Any, url: str) -> Iterator[bytes]:
    """The instances at a WADO-RS URL as the PACS sent them (bytes, not re-encoded).

    ``dicomweb-client`` parses every instance into a dataset; writing those back costs
    more than the transfer, so its multipart decoding (pinned version) is used directly.
    """
    response = client._http_get(url, headers={"Accept": ACCEPT_AS_STORED}, stream=True)
    if response.headers.get("Content-Type", "").startswith("application/dicom"):
        return iter([response.content])  # a single part sent bare (see CP 2040)
    return client._decode_multipart_message(response, stream=True)


def _part10(part: bytes) -> bytes:
    """``part`` as a DICOM file: as sent when it is one, else with its file meta added."""
    if part[128:132] == b"DICM":
        return part
    import io

    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmread(io.BytesIO(part), force=True).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _write_staged(path: Path, data: bytes) -> None:
    """Write then rename, unsynced.

    A file in the staging folder is whole or absent after a crash of this process;
    :func:`sync_filesystem` makes the whole series durable at once.
    """
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _staged_sop_uids(folder: Path, skipped: Counter[str]) -> set[str]:
    """The SOP Instance UIDs of a staged series' files (to resume).

    Unreadable files (torn by a power loss) are removed, to be fetched again.
    """
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_file_meta_info

    held = set()
    for path in folder.glob("*.dcm"):
        try:
            uid = str(read_file_meta_info(path).get("MediaStorageSOPInstanceUID", ""))
        except (InvalidDicomError, ValueError, EOFError, OSError):
            uid = ""
        if uid:
            held.add(uid)
        else:
            path.unlink()
            skipped["a fetched file was unreadable: fetched again"] += 1
    return held


def _value(record: dict[str, Any], tag: str) -> Any:
    v = record.get(tag, {}).get("Value")
    return v[0] if v else None


def _matches(value: Any, pattern: str) -> bool:
    """DICOM wildcard matching (``*``, ``?``), ignoring case; an empty pattern matches all."""
    literal_brackets = pattern.casefold().replace("[", "[[]")  # not a class in DICOM
    return not pattern or fnmatch.fnmatchcase(str(value or "").casefold(), literal_brackets)


def _series_of(record: dict[str, Any]) -> dict[str, Any]:
    count = _value(record, _COUNT)
    return {
        "study": _value(record, _STUDY),
        "series": _value(record, _SERIES),
        "count": int(count) if count is not None else None,
    }


def _unique(records: Iterator[dict[str, Any]] | Any) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["study"] and r["series"]:
            seen.setdefault(r["series"], r)
    return [seen[k] for k in sorted(seen)]


def _series_dir(series_uid: str) -> str:
    return f"s-{uid_key(series_uid)}"
