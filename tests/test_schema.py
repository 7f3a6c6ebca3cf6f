"""The typed records of the wire schema: each reads back what it wrote, and refuses junk."""

from __future__ import annotations

import pytest

from medfed.core.schema import (
    EPSILON_RUN_KEY,
    SECAGG_FIELDS,
    PrivacyReport,
    SecAggReply,
    SiteError,
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
