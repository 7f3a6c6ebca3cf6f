"""`medfed site init`: the site operator's folder (keys, pinned federation CA, site.toml)."""

from __future__ import annotations

import shutil
from pathlib import Path

from medfed.client.secure_site import load_identity
from medfed.core.config import SiteConfig, load_toml
from medfed.core.errors import ConfigError
from medfed.core.identity import SiteKeys, check_certificate_valid, load_certificate

SITE_TOML = """\
# medfed site configuration (written by `medfed site init`). Owned by the site:
# a federated run can never loosen what this file allows.
# Paths are relative to this file. Start the site daemon with:
#   medfed site start --config site.toml

[site]
name = "{name}"
server = "{server}"                    # the coordinator's SuperLink, HOST:PORT
federation_ca = "federation-ca.pem"    # pinned CA of the federation
private_key = "keys/site.key"          # SuperNode authentication key (never leaves this folder)
public_key = "keys/site.pub"           # send it and keys/secagg-identity.pub to be enrolled
runtime_port = {runtime_port}          # local port of the SuperNode's runtime API
worker_socket = "run/worker.sock"      # local channel to the warm worker
audit_log = "audit.jsonl"
heartbeat_interval_s = 30              # a crashed site is offline after 2 x this (10-1800 s)

[data]
# kind = "dicom-folder" reads DICOM series under `path` (labels through `manifest`,
# default <path>/manifest.json; decoded series cached in `cache_dir`);
# "nifti-folder" (keys images/labels), "msd" (a Decathlon task folder; key modality
# for a multi-modal task) and "bids" (keys modality = "T1w", label_pipeline) read NIfTI;
# "dicomweb" reads a PACS (no path: a [data.pacs] table with url, credentials = a mode-600
# file, ca_bundle, and a [data.pacs.query] with modality, series_description, date_from,
# date_to or study_uids; see the README); "synthetic" generates data. Check the source,
# and fetch what is new from a PACS, with `medfed site scan`.
kind = "synthetic"
path = ""
manifest = ""
cache_dir = "cache"   # decoded series, beside this file (the DICOM folder stays read-only)
seed = {seed}
num_samples = 64
val_fraction = 0.25
profile = {profile}
bias_correction = "off"   # "n4": divide each MRI scan by its N4 bias field first (brain tasks)

[policy]
allowed_tasks = ["*"]         # e.g. ["brain-tissue-seg"]
allowed_strategies = ["*"]    # e.g. ["fedavg", "fedprox"]
# Harmonization "histogram" asks for 11 intensity quantiles of your training scans (not
# covered by DP; refused under DP anyway). Under secure aggregation they are sent in the
# clear only if this is true.
share_landmarks = false

[privacy]
# The site's privacy budget per dataset, enforced here and recorded in the ledger
# (`medfed site budget`). A run asking for less privacy than a rule allows is refused.
default = "default"
ledger = "privacy/ledger.sqlite"
secagg_min_participants = 2  # the fewest sites this site masks its update with: a run whose
                             # secure-aggregation threshold allows smaller rounds is refused

[privacy.datasets.default]
epsilon_max = 10.0           # total epsilon this dataset may ever spend, across all runs
delta = 1e-5                 # largest delta a run may use
min_noise_multiplier = 0.5   # least noise a DP run may ask for
max_clipping_norm = 5.0      # largest clipping norm a DP run may ask for
dp_required = false          # true: refuse every run without differential privacy
privacy_unit = "sample"      # "scan" / "patient": refuse DP-SGD runs protecting less
                             # (set it before the first run: raising it later refuses
                             # the dataset, whose earlier epsilon bounds less)
max_fitted_noise_multiplier = 0.0  # > 0: when a run's epsilon would not fit what is left,
                             # take part with more noise, up to this, instead of refusing

[compute]
device = "auto"   # "auto" uses CUDA when present, else the CPU
amp = true
threads = 0
"""


def init_site(
    folder: Path,
    *,
    name: str,
    federation_ca: Path,
    server: str = "127.0.0.1:9200",
    runtime_port: int = 9300,
    seed: int = 0,
    profile: int = 0,
) -> Path:
    """Create a site folder; returns the path of its site.toml."""
    folder = Path(folder)
    config_path = folder / "site.toml"
    if config_path.exists():
        raise ConfigError(
            "A site already exists in this folder.",
            where=str(config_path),
            fix="choose an empty folder, or keep using the existing site.toml",
        )
    ca = load_certificate(federation_ca)
    check_certificate_valid(ca, where=str(federation_ca))
    folder.mkdir(parents=True, exist_ok=True)
    text = SITE_TOML.format(
        name=name, server=server, runtime_port=runtime_port, seed=seed, profile=profile
    )
    config_path.write_text(text, encoding="utf-8")
    config = load_toml(config_path, SiteConfig)  # the template must itself be valid
    shutil.copyfile(federation_ca, folder / config.site.federation_ca)
    SiteKeys.create().save(folder / config.site.private_key, folder / config.site.public_key)
    load_identity(folder)  # the secure-aggregation identity, enrolled beside site.pub
    return config_path
