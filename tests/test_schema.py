"""The typed records of the wire schema: each reads back what it wrote, and refuses junk."""

from __future__ import annotations

import pytest

from medfed.core.schema import (
    EPSILON_RUN_KEY,
    PROXIMAL_MU_KEY,
    RUN_CONFIG_KEY,
    SECAGG_DEADLINE,
    SECAGG_DIRECTORY,
    SECAGG_FIELDS,
    SECAGG_PARTICIPANTS,
    SERVER_ROUND_KEY,
    PrivacyReport,
    SecAggReply,
    SiteError,
    SiteInstruction,
    SiteRecord,
    medfed_version,
)


@pytest.mark.parametrize(
    "reply",
    [
        SecAggReply(advert=b"\x01advert", identity=b"\x02" * 32),
        SecAggReply(update=b"header"),
        SecAggReply(reveal=b""),
        SecAggReply(),
    ],
)
def test_a_secagg_reply_reads_back(reply: SecAggReply) -> None:
    blobs = reply.blobs()
    assert set(blobs) <= set(SECAGG_FIELDS)
    assert SecAggReply.from_record(blobs) == reply


def test_a_secagg_record_with_junk_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown secure-aggregation fields \\['advertz'\\]"):
        SecAggReply.from_record({"advertz": b"x"})
    with pytest.raises(ValueError, match="'update' is str"):
        SecAggReply.from_record({"update": "not bytes"})
    with pytest.raises(KeyError, match="no secure-aggregation 'reveal'"):
        SecAggReply(update=b"x").need("reveal")


def test_a_privacy_report_reads_back_from_metrics() -> None:
    report = PrivacyReport(
        epsilon=0.5, epsilon_run=1.25, epsilon_remaining=6.75, noise_multiplier=1.1
    )
    metrics = {**report.metrics(), "dice": 0.8, "steps": 12}
    assert metrics[EPSILON_RUN_KEY] == 1.25
    assert PrivacyReport.from_metrics(metrics) == report
    assert PrivacyReport.from_metrics({"dice": 0.8}) is None  # a round without DP


@pytest.mark.parametrize(
    "error",
    [
        SiteError("site-a", "refused", "privacy.datasets.brain.epsilon_max", "spent 3 > 2 [sic]"),
        SiteError("site-b", "failed", "", 'ValueError: "quoted"\nsecond line: {braces}'),
    ],
)
def test_a_site_error_reads_back_with_or_without_the_executors_prefix(error: SiteError) -> None:
    assert SiteError.parse(error.text()) == error
    assert SiteError.parse(f"RuntimeError: {error.text()}") == error
    assert SiteError.parse(f"flwr.common.ClientAppException: {error.text()}") == error


def test_text_that_is_not_a_site_error_is_none() -> None:
    good = SiteError("site-a", "refused", "r", "why").text()
    assert SiteError.parse("ConnectionError: the SuperNode went away") is None
    assert SiteError.parse(good.replace('"refused"', '"maybe"')) is None  # not a status
    assert SiteError.parse(good.replace('"rule"', '"rules"')) is None  # not its fields


def test_a_site_request_reads_back_from_its_header() -> None:
    from medfed.core.schema import SiteRequest

    request = SiteRequest("train", 12, {"medfed-run": "{}", "server-round": 3})
    assert SiteRequest.from_header(request.header()) == request
    with pytest.raises(ValueError, match="config is list"):
        SiteRequest.from_header({"op": "train", "config": [1]})


@pytest.mark.parametrize(
    "reply_kind",
    ["result", "refused", "failed"],
)
def test_a_site_reply_reads_back_from_its_header(reply_kind: str) -> None:
    from medfed.core.schema import SiteReply

    if reply_kind == "result":
        reply = SiteReply.result("site-a", {"dice": 0.5, "num-examples": 12})
    else:
        reply = SiteReply.refusal("site-a", "policy.allowed_tasks", "no", status=reply_kind)
    assert SiteReply.from_header(reply.header()) == reply
    assert (reply.error is None) == (reply_kind == "result")
    # a worker that said nothing about why still yields an error naming the site
    bare = SiteReply.from_header({"ok": False, "site": "site-b"})
    assert bare.error == SiteError("site-b", "failed", "", "no reason given")


@pytest.mark.parametrize(
    "asked",
    [
        SiteInstruction(),
        SiteInstruction(run='{"task": "x"}', proof="sig", revocations="PEM", server_round=3),
        SiteInstruction(server_round=2, proximal_mu=0.01),
        SiteInstruction(join='{"mode": "default"}'),
        SiteInstruction(unmask=b"\x00\x01req", server_round=4),
        SiteInstruction(run_ended="refused"),
        SiteInstruction(
            roster=b"roster",
            directory={"site-a": "ab", "site-b": "cd"},
            certificates={"site-a": "-----BEGIN CERTIFICATE-----"},
            participants=("site-a", "site-b"),
            deadline=1_700_000_000.5,
        ),
    ],
)
def test_a_site_instruction_reads_back_from_its_config_entries(asked: SiteInstruction) -> None:
    entries = asked.entries()
    # As a request frame carries them: bytes values beside the header's config values.
    config = {k: v for k, v in entries.items() if not isinstance(v, bytes)}
    blobs = {k: v for k, v in entries.items() if isinstance(v, bytes)}
    assert SiteInstruction.read(config, blobs) == asked


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({SERVER_ROUND_KEY: "3"}, SERVER_ROUND_KEY),
        ({SERVER_ROUND_KEY: 2.5}, SERVER_ROUND_KEY),
        ({PROXIMAL_MU_KEY: float("nan")}, PROXIMAL_MU_KEY),
        ({SECAGG_PARTICIPANTS: '{"site-a": 1}'}, SECAGG_PARTICIPANTS),
        ({SECAGG_DIRECTORY: "not json"}, SECAGG_DIRECTORY),
        ({SECAGG_DEADLINE: True}, SECAGG_DEADLINE),
        ({RUN_CONFIG_KEY: 7}, RUN_CONFIG_KEY),
    ],
)
def test_a_site_instruction_of_the_wrong_type_is_refused_naming_its_key(
    config: dict, names: str
) -> None:
    with pytest.raises(ValueError, match=repr(names)):
        SiteInstruction.read(config, {})


def test_a_site_record_reads_back_and_refuses_a_bad_name_or_version() -> None:
    here = SiteRecord.here("site-a")
    assert here.version == medfed_version() and SiteRecord.from_record(here.entries()) == here
    assert SiteRecord.from_record({"name": "site-a"}) == SiteRecord("site-a")  # an older site
    assert set(here.entries()) == {"name", "medfed-version"}  # nothing else about the site
    with pytest.raises(ValueError, match="'name'"):
        SiteRecord.from_record({"medfed-version": "0.1.0"})
    for junk in ("", "0.1 beta", "x" * 65, 1.0):
        with pytest.raises(ValueError, match="medfed-version"):
            SiteRecord.from_record({"name": "site-a", "medfed-version": junk})
