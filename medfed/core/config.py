"""Typed, validated configuration: server.toml, site.toml and the run configuration.

Every model forbids unknown keys, so a typo is an error that names the file and
the key instead of a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medfed.core.errors import ConfigError
from medfed.core.privacy import RunPrivacy, SitePrivacyPolicy
from medfed.core.schema import RUN_CONFIG_KEY

M = TypeVar("M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9200, got {value!r}")
    return value


# --------------------------------------------------------------------------- server


class SuperLinkSection(_Strict):
    """Where the SuperLink listens (its HTTP API carries Fleet, Control and ServerAppIo)."""

    host: str = "127.0.0.1"
    port: int = Field(9200, gt=0, lt=65536)
    public_host: str = Field(
        "127.0.0.1", description="the host name sites use; must be one of the certificate's SANs"
    )
    control_from: list[str] = Field(
        ["this-host"],
        description="sources the Control API (enrol, launch, stop, list) "
        "accepts calls from: 'this-host' (the server host's own addresses), networks such "
        "as '10.20.0.0/16' for coordinators elsewhere, or 'any'; a signature is needed "
        "either way",
    )

    @field_validator("control_from")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        for item in value:
            if item not in ("this-host", "any"):
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(
                        f"{item!r} is not 'this-host', 'any' or a network such as '10.20.0.0/16'"
                    ) from None
        return value

    @property
    def address(self) -> str:
        """HOST:PORT as clients dial it."""
        return f"{self.public_host}:{self.port}"


class TlsSection(_Strict):
    """Paths of the federation CA and the server certificate, relative to the config file."""

    ca_cert: str = "ca/ca.pem"
    ca_key: str = "ca/ca.key"
    cert: str = "tls/server.pem"
    key: str = "tls/server.key"


class StateSection(_Strict):
    """Persistent server state."""

    database: str = "state/superlink.db"
    runs_dir: str = "runs"
    sites_file: str = "sites.toml"
    log_file: str = "state/superlink.log"
    #: Coordinators' public keys: who may use the Control API (enrol, start, stop, list).
    coordinators_file: str = "coordinators.toml"
    #: Every Control API call, allowed or refused, with who made it.
    control_audit_log: str = "state/control-audit.jsonl"


class CoordinatorSection(_Strict):
    """The federation folder's own coordinator credential (`medfed server init` made it)."""

    credential: str = "coordinator/coordinator.key"


class ServerConfig(_Strict):
    """server.toml: the coordinator's federation folder."""

    federation: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    superlink: SuperLinkSection = SuperLinkSection()
    tls: TlsSection = TlsSection()
    state: StateSection = StateSection()
    coordinator: CoordinatorSection = CoordinatorSection()


# ----------------------------------------------------------------------------- site


class PacsQuery(_Strict):
    """Which series of the PACS a site trains on (QIDO-RS filters; all given must match)."""

    modality: str = Field("", description="e.g. MR; empty: any")
    study_description: str = Field("", description="QIDO match, * and ? as wildcards")
    series_description: str = Field("", description="QIDO match, * and ? as wildcards")
    date_from: str = Field("", pattern=r"^(\d{8})?$", description="StudyDate from, YYYYMMDD")
    date_to: str = Field("", pattern=r"^(\d{8})?$", description="StudyDate to, YYYYMMDD")
    study_uids: list[str] = Field([], description="only these StudyInstanceUIDs")


class PacsSection(_Strict):
    """A PACS reached over DICOMweb (QIDO-RS to search, WADO-RS to fetch; never written to).

    Credentials never stand in site.toml: ``credentials`` names a file (mode 600) with
    ``username``/``password`` or ``token``; without it the environment's
    ``MEDFED_PACS_USERNAME``/``MEDFED_PACS_PASSWORD`` or ``MEDFED_PACS_TOKEN`` are used.
    """

    url: str = Field("", description="the DICOMweb root, e.g. https://pacs.example/dicom-web")
    credentials: str = Field("", description="credentials file, relative to site.toml")
    ca_bundle: str = Field(
        "", description="PEM CA(s) that sign the PACS's certificate; default: the system's"
    )
    client_cert: str = Field("", description="PEM client certificate (mutual TLS)")
    client_key: str = Field("", description="its key")
    timeout_s: float = Field(60.0, gt=0)
    query: PacsQuery = PacsQuery()


class DataSourceConfig(_Strict):
    """A site's data source for a task.

    ``kind = "synthetic"`` generates data deterministically from ``seed`` (demo,
    tests); ``kind = "dicom-folder"`` reads DICOM series under ``path``;
    ``"nifti-folder"``, ``"msd"`` and ``"bids"`` read a NIfTI dataset in that layout
    (:mod:`medfed.data.nifti_layouts`); ``"dicomweb"`` fetches the series that
    ``[data.pacs.query]`` matches from a PACS (:mod:`medfed.data.dicomweb`).
    """

    kind: Literal["synthetic", "dicom-folder", "nifti-folder", "msd", "bids", "dicomweb"] = (
        "synthetic"
    )
    path: str = Field("", description="the data folder (all but synthetic), relative to site.toml")
    manifest: str = Field(
        "", description="dicom-folder: label manifest; default <path>/manifest.json"
    )
    images: str = Field(
        "", description="nifti-folder: image path template, default images/{subject}.nii.gz"
    )
    labels: str = Field(
        "", description="nifti-folder: label path template, default labels/{subject}.nii.gz"
    )
    modality: str = Field(
        "",
        description="msd: the modality of a multi-modal task; bids: "
        "the scan suffix (T1w, T2w, FLAIR, ...)",
    )
    label_pipeline: str = Field(
        "", description="bids: the derivatives pipeline holding the _dseg labels"
    )
    targets: str = Field(
        "",
        description="per-subject targets (JSON or TSV/CSV); default "
        "targets.json (bids: participants.tsv)",
    )
    pacs: PacsSection | None = Field(None, description="dicomweb: the PACS and the query")
    cache_dir: str = Field("", description="decoded-series cache; site.toml default: cache/")
    seed: int = 0
    num_samples: int = Field(64, gt=0)
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    profile: int = Field(0, ge=0, description="synthetic scanner profile of this site")
    bias_correction: Literal["off", "n4"] = Field(
        "off",
        description="MRI bias-field correction before a brain task's preprocessing "
        "(n4: SimpleITK's N4)",
    )


class SiteSection(_Strict):
    """The site's identity and how it reaches the federation."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    server: str = "127.0.0.1:9200"
    federation_ca: str = "federation-ca.pem"
    private_key: str = "keys/site.key"
    public_key: str = "keys/site.pub"
    runtime_port: int = Field(9300, gt=0, lt=65536, description="SuperNode's local runtime API")
    worker_socket: str = "run/worker.sock"
    audit_log: str = "audit.jsonl"
    heartbeat_interval_s: float = Field(
        30.0,
        ge=10.0,
        le=1800.0,
        description="how often the SuperNode tells the server it is alive; the server "
        "counts a site that stopped without signing off (crash, power or network cut) "
        "as offline after two missed intervals. Flower's SuperLink accepts 10 to 1800 s",
    )

    _server = field_validator("server")(lambda cls, v: _check_address(v))


class PolicySection(_Strict):
    """The site's own rules; a run cannot loosen them."""

    allowed_tasks: list[str] = ["*"]
    allowed_strategies: list[str] = ["*"]
    share_landmarks: bool = Field(
        False,
        description="under secure aggregation, may this site send its intensity "
        "landmarks (11 quantiles of its training scans' intensities, not covered by "
        "DP) in the clear, for harmonization 'histogram'",
    )


class ComputeSection(_Strict):
    """Where the site trains."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 leaves torch's default")


class SiteConfig(_Strict):
    """site.toml: the site operator's folder."""

    site: SiteSection
    data: DataSourceConfig = DataSourceConfig()
    policy: PolicySection = PolicySection()
    privacy: SitePrivacyPolicy = SitePrivacyPolicy()
    compute: ComputeSection = ComputeSection()


# ------------------------------------------------------------------------------ run


class RunConfig(_Strict):
    """What the coordinator submits: declarative, validated before anything starts."""

    task: str
    strategy: str = "fedavg"
    strategy_options: dict[str, float | int | str | bool] = {}
    rounds: int = Field(3, gt=0, le=10_000)
    min_sites: int = Field(2, gt=0)
    local_epochs: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    round_timeout_s: float = Field(600.0, gt=0)
    seed: int = 0
    name: str = ""
    privacy: RunPrivacy = RunPrivacy()
    secure_aggregation: Literal["default", "strict", "off"] = Field(
        "default", description="pairwise-masked updates; 'off' only for debugging"
    )
    secagg_clip: float = Field(
        1.0,
        gt=0,
        description="each coordinate of a site's update (local - global) is "
        "clipped to +-secagg_clip before quantization",
    )
    secagg_threshold: int | None = Field(
        None,
        ge=1,
        description="secure aggregation's threshold t: a round needs t + 1 "
        "sites, and t survivors unmask a dropped one; default ceil((n - 1) / 2) of the n "
        "enrolled sites. Set it below the sites a round samples (fraction_train < 1)",
    )
    dataset: str = Field(
        "", description="the site dataset budget to charge; default: the site's privacy.default"
    )
    adaptation: str = Field(
        "none",
        description="domain-adaptation hook (`medfed "
        "adaptations`): which parameters each site keeps local",
    )
    harmonization: Literal["off", "histogram", "histogram-public"] = Field(
        "off",
        description="site-side intensity harmonization: 'histogram' maps every scan "
        "onto landmarks the sites agree on before the first round (Nyul & Udupa); "
        "refused under DP, and under secure aggregation unless the site allows it. "
        "'histogram-public' maps them onto the task's public landmarks (its public "
        "pretraining scans'): no site sends anything, so it runs under DP",
    )
    augmentation: Literal["off", "contrast"] = Field(
        "off",
        description="site-side training augmentation: 'contrast' remaps half of each "
        "site's training images by a random intensity curve (SynthSeg-style contrast "
        "randomization), so one shared model reads every scanner's contrast",
    )
    init_from: str = Field(
        "",
        description="start from an earlier run's checkpoint: "
        "'RUN_ID' (its last round) or 'RUN_ID:ROUND'; default: fresh weights",
    )
    init_weights: Literal["random", "public"] = Field(
        "random",
        description="the model's starting weights: 'random' (seeded by seed) or "
        "'public' (the task's weights pretrained on public data; no site's data, no "
        "privacy budget); init_from then replaces the shared part",
    )
    keep_checkpoints: int = Field(
        0,
        ge=0,
        description="how many rounds' global models the run folder keeps: the last N "
        "(the final model is always one of them); 0 keeps every round. A 50M-parameter "
        "model's checkpoint is 200 MB, so a long run at real model size fills a disk",
    )
    resume_of: str = Field(
        "",
        description="set by the server when it resumes a run after a "
        "crash: the run's original id, under which its folder, its sites' "
        "privacy ledgers and site-local parameters go on; never set by hand",
    )

    def to_json(self) -> str:
        """Serialise for Flower's run config (one string value)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Parse what :meth:`to_json` wrote; a malformed payload is a ConfigError."""
        try:
            return cls.model_validate(json.loads(text))
        except (ValidationError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"The run configuration is invalid: {exc}", where=f"run config {RUN_CONFIG_KEY!r}"
            ) from exc


# ------------------------------------------------------------------------- loading


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        return key, "a value (this key is required)"
    if kind == "extra_forbidden":
        return key, "no such key: remove it or fix its spelling"
    msg = str(error["msg"]).removeprefix("Value error, ")
    return key, f"{msg} (got {error.get('input')!r})"


def validate(model: type[M], data: dict[str, Any], *, where: str) -> M:
    """Validate ``data`` as ``model``; the error names each bad key and what it expects."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        keys = ", ".join(repr(k) for k, _ in problems)
        raise ConfigError(
            f"Invalid configuration: {len(problems)} bad key(s): {keys}.",
            where=where,
            expected="; ".join(f"{k}: {m}" for k, m in problems),
            fix=f"edit {where} and correct the key(s) named above",
        ) from None


def load_toml(path: Path, model: type[M]) -> M:
    """Read and validate a TOML file as ``model``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            "Config file not found.",
            where=str(path),
            fix="pass the path of an existing file, or create one with `medfed server init` / "
            "`medfed site init`",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Not valid TOML: {exc}", where=str(path)) from None
    return validate(model, data, where=str(path))


def write_toml(path: Path, model: BaseModel, *, header: str = "") -> None:
    """Write ``model`` as TOML, refusing to overwrite an existing file."""
    text = tomli_w.dumps(model.model_dump(mode="json", exclude_none=True))
    with open(path, "x", encoding="utf-8") as fh:
        fh.write(header + text)


#: Keys of [data] that only some kinds read; set for another kind they are a mistake.
_KIND_KEYS = {
    "manifest": ("dicom-folder", "dicomweb"),
    "pacs": ("dicomweb",),
    "images": ("nifti-folder",),
    "labels": ("nifti-folder",),
    "modality": ("msd", "bids"),
    "label_pipeline": ("bids",),
    "targets": ("nifti-folder", "msd", "bids"),
}


def resolve_data_source(config_path: Path, source: DataSourceConfig) -> DataSourceConfig:
    """``source`` with its paths made absolute (relative to the site.toml that declared them)."""
    if source.kind == "synthetic":
        return source
    for key, kinds in _KIND_KEYS.items():
        if getattr(source, key) and source.kind not in kinds:
            raise ConfigError(
                f"data.{key} does not apply to data.kind = {source.kind!r}.",
                where=f"{config_path} [data] {key}",
                expected=f"data.{key} only with kind {' or '.join(map(repr, kinds))}",
                fix=f"remove data.{key}, or set the kind it belongs to",
            )
    if source.kind == "dicomweb":
        return _resolve_pacs(config_path, source)
    if not source.path:
        raise ConfigError(
            f"data.kind is {source.kind!r} but data.path is empty.",
            where=f"{config_path} [data]",
            expected="the folder holding the site's "
            + ("DICOM files" if source.kind == "dicom-folder" else "dataset"),
            fix='set data.path = "dicom"'
            if source.kind == "dicom-folder"
            else 'set data.path = "data"',
        )
    root = resolve(config_path, source.path)
    if source.kind != "dicom-folder":
        targets = resolve(config_path, source.targets) if source.targets else None
        return source.model_copy(
            update={
                "path": str(root),
                "targets": str(targets) if targets else "",
                "cache_dir": str(resolve(config_path, source.cache_dir or "cache")),
            }
        )
    manifest = resolve(config_path, source.manifest) if source.manifest else root / "manifest.json"
    return source.model_copy(
        update={
            "path": str(root),
            "manifest": str(manifest) if manifest.exists() else "",
            "cache_dir": str(resolve(config_path, source.cache_dir or "cache")),
        }
    )


def _resolve_pacs(config_path: Path, source: DataSourceConfig) -> DataSourceConfig:
    where = f"{config_path} [data.pacs]"
    pacs = source.pacs
    if pacs is None or not pacs.url:
        raise ConfigError(
            "data.kind is 'dicomweb' but no PACS is named.",
            where=where,
            expected="[data.pacs] with url = the DICOMweb root",
            fix='add [data.pacs] url = "https://pacs.example/dicom-web"',
        )
    if source.path:
        raise ConfigError(
            "data.path does not apply to data.kind = 'dicomweb'.",
            where=f"{config_path} [data] path",
            expected="the series come from [data.pacs]; they are kept in data.cache_dir",
            fix="remove data.path",
        )
    paths = {
        key: str(resolve(config_path, getattr(pacs, key))) if getattr(pacs, key) else ""
        for key in ("credentials", "ca_bundle", "client_cert", "client_key")
    }
    manifest = resolve(config_path, source.manifest) if source.manifest else None
    return source.model_copy(
        update={
            "pacs": pacs.model_copy(update=paths),
            "manifest": str(manifest) if manifest else "",
            "cache_dir": str(resolve(config_path, source.cache_dir or "cache")),
        }
    )


def resolve(config_path: Path, relative: str) -> Path:
    """Resolve a path from a config file relative to that file's folder."""
    p = Path(relative).expanduser()
    return p if p.is_absolute() else (Path(config_path).resolve().parent / p)
