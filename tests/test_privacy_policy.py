"""Site privacy policy vs. what a run asks: a run can never loosen the site's policy."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medfed.core.errors import ConfigError
from medfed.core.privacy import (
    DatasetBudget,
    RunPrivacy,
    SitePrivacyPolicy,
    check_run_against_policy,
)

BRAIN = DatasetBudget(
    epsilon_max=8.0, delta=1e-5, min_noise_multiplier=0.8, max_clipping_norm=1.0, dp_required=True
)


def _check(**run: object):
    return check_run_against_policy(RunPrivacy(**run), BRAIN, dataset="brain")


def test_a_run_that_meets_the_policy_is_allowed() -> None:
    decision = _check(mode="sample", noise_multiplier=1.0, max_grad_norm=1.0)
    assert decision.allowed and decision.rule == ""
    assert _check(mode="update", noise_multiplier=0.8, clipping_norm=0.5).allowed


@pytest.mark.parametrize(
    ("run", "rule", "values"),
    [
        ({"mode": "off"}, "privacy.datasets.brain.dp_required", ["'off'"]),
        (
            {"mode": "sample", "noise_multiplier": 0.5},
            "privacy.datasets.brain.min_noise_multiplier",
            ["0.5", "0.8"],
        ),
        (
            {"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 5.0},
            "privacy.datasets.brain.max_clipping_norm",
            ["max_grad_norm = 5", "maximum 1"],
        ),
        (
            {"mode": "update", "noise_multiplier": 1.0, "clipping_norm": 2.0},
            "privacy.datasets.brain.max_clipping_norm",
            ["clipping_norm = 2", "maximum 1"],
        ),
        (
            {"mode": "sample", "noise_multiplier": 1.0, "target_delta": 1e-3},
            "privacy.datasets.brain.delta",
            ["0.001", "1e-05"],
        ),
    ],
)
def test_a_run_loosening_the_policy_is_refused_with_the_rule_named(
    run: dict, rule: str, values: list[str]
) -> None:
    decision = _check(**run)
    assert not decision.allowed
    assert decision.rule == rule
    assert rule in decision.reason
    for value in values:
        assert value in decision.reason


def test_dp_off_is_allowed_only_where_not_required() -> None:
    relaxed = BRAIN.model_copy(update={"dp_required": False})
    assert check_run_against_policy(RunPrivacy(mode="off"), relaxed, dataset="brain").allowed


def test_a_noise_derived_from_target_epsilon_is_checked_like_an_asked_one() -> None:
    run = RunPrivacy(mode="sample", target_epsilon=8.0)  # no noise_multiplier: the site's
    decision = check_run_against_policy(run, BRAIN, dataset="brain", noise_multiplier=0.6)
    assert decision.rule == "privacy.datasets.brain.min_noise_multiplier"
    assert "target_epsilon = 8" in decision.reason and "0.6" in decision.reason
    assert check_run_against_policy(run, BRAIN, dataset="brain", noise_multiplier=0.9).allowed


def test_schemas_are_strict() -> None:
    with pytest.raises(ValidationError):
        RunPrivacy(mode="sample", noise_multiplier=0.0)  # DP on without noise
    with pytest.raises(ValidationError):
        RunPrivacy(mode="update", target_epsilon=-1.0)
    with pytest.raises(ValidationError):
        RunPrivacy(mode="sample", noise_multiplier=1.0, noise=2.0)  # typo'd key
    with pytest.raises(ValidationError):
        DatasetBudget(epsilon_max=1.0, delta=0.5)
    with pytest.raises(ValidationError):
        DatasetBudget(epsilon_max=0.0)
    with pytest.raises(ValidationError):
        SitePrivacyPolicy(datasets={"brain": BRAIN}, default="lung")


def test_budget_lookup_fails_closed_on_an_unknown_dataset() -> None:
    policy = SitePrivacyPolicy(datasets={"brain": BRAIN}, default="brain")
    assert policy.budget_for() == ("brain", BRAIN)
    with pytest.raises(ConfigError, match="lung"):
        policy.budget_for("lung")
