"""Privacy schemas: a site's per-dataset budget policy, what a run asks, and the check.

Two halves, owned by two people:

- :class:`SitePrivacyPolicy` is the ``[privacy]`` section a site operator writes in
  ``site.toml``: per dataset an (epsilon, delta) budget, the least noise and the
  largest clipping norm the site accepts, whether DP is required at all, and how much
  noise the site may add of its own to fit a run into what is left of its budget.
- :class:`RunPrivacy` is what a coordinator's run asks for: no DP, sample-level
  DP-SGD (``"sample"``) or update-level (user-level) DP (``"update"``).

:func:`check_run_against_policy` is pure: a run that asks for less privacy than
the site's policy is refused with the ``site.toml`` key of the rule it breaks and
both values. A run can never loosen the policy; it may only ask for more privacy.

The core imports nothing of the client, so the answer is this module's own
:class:`PrivacyDecision` (same shape as ``medfed.client.policy.Decision``:
``allowed``, ``rule``, ``reason``), which the worker can turn into a refusal reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medfed.core.errors import ConfigError

Accountant = Literal["rdp", "prv"]
PrivacyMode = Literal["off", "sample", "update"]
DPOptimizer = Literal["adam", "sgd"]
#: What DP-SGD protects, finest first: one training example, every example cut from
#: one scan, or every example of one patient (all their scans, by DICOM PatientID).
PrivacyUnit = Literal["sample", "scan", "patient"]
#: Ranks of what a spend protected; "site" is update-level DP (a site's whole data).
_UNIT_RANK = {"sample": 0, "scan": 1, "patient": 2, "site": 3}


def unit_covers(unit: str, required: str) -> bool:
    """Whether epsilon spent protecting ``unit`` also bounds a whole ``required`` unit."""
    return _UNIT_RANK[unit] >= _UNIT_RANK[required]


_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetBudget(_Strict):
    """One dataset's privacy budget and the least privacy a run on it must ask for.

    ``epsilon_max`` is the total over all runs and coordinators (basic composition
    across runs, see ``medfed.client.ledger``); ``delta`` is the largest delta a run
    may account at.
    """

    epsilon_max: float = Field(gt=0.0, description="total epsilon this dataset may ever spend")
    delta: float = Field(1e-5, gt=0.0, le=1e-2, description="largest delta a run may use")
    min_noise_multiplier: float = Field(0.0, ge=0.0, description="least noise a run may ask for")
    max_clipping_norm: float = Field(
        10.0, gt=0.0, description="largest per-sample (or per-update) clipping norm of a run"
    )
    dp_required: bool = Field(True, description="refuse runs without differential privacy")
    privacy_unit: PrivacyUnit = Field(
        "sample",
        description="the least a DP-SGD run must protect: 'scan' refuses runs "
        "whose epsilon covers one training example (a slice); 'patient' also refuses runs "
        "per scan",
    )
    max_fitted_noise_multiplier: float = Field(
        0.0,
        ge=0.0,
        description="0: refuse the rounds of a run that do not fit the "
        "remaining budget. Above 0: take part with more noise instead, the least (up to "
        "this noise multiplier) that fits the run's remaining rounds into what is left",
    )


class SitePrivacyPolicy(_Strict):
    """``[privacy]`` of site.toml: budgets per dataset and where the ledger lives."""

    datasets: dict[str, DatasetBudget] = {}
    default: str = Field("", description="the dataset a run uses when it names none")
    ledger: str = Field("privacy/ledger.sqlite", description="SQLite ledger, relative to site.toml")
    secagg_min_participants: int = Field(
        2,
        ge=2,
        description="the fewest sites this site masks its update with: a run whose "
        "secure-aggregation threshold lets smaller rounds through is refused",
    )

    @model_validator(mode="after")
    def _check_names(self) -> SitePrivacyPolicy:
        for name in self.datasets:
            if not re.match(_NAME, name):
                raise ValueError(
                    f"dataset name {name!r} must match {_NAME} (letters, digits, '.', '_', '-')"
                )
        if self.default and self.default not in self.datasets:
            raise ValueError(
                f"privacy.default = {self.default!r} is not one of privacy.datasets "
                f"{sorted(self.datasets)}"
            )
        return self

    def budget_for(self, dataset: str = "") -> tuple[str, DatasetBudget]:
        """The dataset's name and budget (``default`` when ``dataset`` is empty).

        Raises
        ------
        ConfigError
            The dataset has no budget in site.toml (fail closed: no budget, no DP run).
        """
        name = dataset or self.default
        if name not in self.datasets:
            raise ConfigError(
                f"No privacy budget for dataset {name!r} at this site.",
                where="site.toml [privacy.datasets]",
                expected=f"one of {sorted(self.datasets)}" if self.datasets else "a budget",
                fix=f"add [privacy.datasets.{name or 'NAME'}] with epsilon_max and delta, "
                "or set privacy.default",
            )
        return name, self.datasets[name]


class RunPrivacy(_Strict):
    """What a run asks of every site.

    ``mode = "sample"``: DP-SGD (Opacus): Poisson sampling, per-sample clipping to
    ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``.
    ``mode = "update"``: user-level DP of the site's whole update: the update is
    L2-clipped to ``clipping_norm`` and noised with std
    ``noise_multiplier * clipping_norm`` at the site, before encryption.

    ``target_epsilon`` asks for a privacy level instead of a noise level: each site
    derives the noise multiplier that spends at most that epsilon over the run's
    rounds on its own data (a site with more data needs less noise for the same
    epsilon), never below ``noise_multiplier``. The site's policy then checks the
    noise it derived, and its ledger charges what it actually spends.
    """

    mode: PrivacyMode = "off"
    noise_multiplier: float = Field(
        0.0, ge=0.0, description="the noise every site adds; with target_epsilon, a floor"
    )
    target_epsilon: float = Field(
        0.0,
        ge=0.0,
        description="each site derives its own noise multiplier: the smallest "
        "keeping its epsilon after the run's rounds at or below this (0 = off)",
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample clipping norm (sample mode)")
    clipping_norm: float = Field(1.0, gt=0.0, description="update clipping norm (update mode)")
    target_delta: float = Field(1e-5, gt=0.0, le=1e-2)
    accountant: Accountant = "rdp"
    optimizer: DPOptimizer = Field(
        "adam",
        description="DP-SGD's optimizer (sample mode): 'adam', or 'sgd' (momentum "
        "0.9; give it a learning rate near 0.33 at max_grad_norm 0.3 with the run's "
        "learning_rate)",
    )
    average_iterates: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="sample mode: the site sends an exponential moving "
        "average of its DP iterates with this decay (e.g. 0.9) instead of the last one; "
        "post-processing, so free in privacy; 0 = off",
    )
    unit: PrivacyUnit = Field(
        "sample",
        description="sample mode: what epsilon protects. 'sample': one training "
        "example (for brain-tissue-seg one slice); 'scan': all the examples cut from one "
        "scan; 'patient': all of one patient's scans (DICOM PatientID). Poisson sampling "
        "and clipping then work per unit, and the batch size counts units",
    )

    @model_validator(mode="after")
    def _noise_when_on(self) -> RunPrivacy:
        if self.mode != "off" and self.noise_multiplier <= 0 and self.target_epsilon <= 0:
            raise ValueError(
                f"privacy.mode = {self.mode!r} needs privacy.noise_multiplier > 0 or "
                f"privacy.target_epsilon > 0 (got {self.noise_multiplier} and "
                f"{self.target_epsilon})"
            )
        return self

    @property
    def clipping(self) -> float:
        """The clipping norm the mode uses (per sample, or per update)."""
        return self.clipping_norm if self.mode == "update" else self.max_grad_norm


@dataclass(frozen=True)
class PrivacyDecision:
    """The check's answer; ``rule`` names the site.toml key behind a refusal."""

    allowed: bool
    rule: str = ""
    reason: str = ""


def check_run_against_policy(
    run: RunPrivacy,
    budget: DatasetBudget,
    *,
    dataset: str,
    noise_multiplier: float | None = None,
) -> PrivacyDecision:
    """Refuse a run that asks for less privacy than ``budget`` requires.

    Checked in order: DP switched off while required; a DP-SGD run protecting a finer
    unit than the policy's ``privacy_unit``; noise below the minimum; clipping norm
    above the maximum; delta above the budget's. The first rule
    broken is named (``privacy.datasets.<dataset>.<key>``) with both values.
    Whether the round's epsilon still fits the remaining budget is the ledger's
    question, asked separately (it needs the site's history). ``noise_multiplier`` is
    the noise the site would add when it derived it from the run's ``target_epsilon``.
    """
    key = f"privacy.datasets.{dataset}"
    if run.mode == "off":
        if budget.dp_required:
            return PrivacyDecision(
                False,
                f"{key}.dp_required",
                f"the run asks for privacy.mode = 'off' but this site requires differential "
                f"privacy on dataset {dataset!r} ({key}.dp_required = true); "
                "ask for mode 'sample' or 'update'",
            )
        return PrivacyDecision(True)
    if run.mode == "sample" and not unit_covers(run.unit, budget.privacy_unit):
        return PrivacyDecision(
            False,
            f"{key}.privacy_unit",
            f"the run asks for privacy.unit = {run.unit!r} but this site protects at least "
            f"a whole {budget.privacy_unit} on dataset {dataset!r} ({key}.privacy_unit = "
            f"{budget.privacy_unit!r}); ask for privacy.unit = {budget.privacy_unit!r} "
            f"(medfed run --privacy-unit {budget.privacy_unit}) or update-level DP",
        )
    noise = run.noise_multiplier if noise_multiplier is None else noise_multiplier
    if noise < budget.min_noise_multiplier:
        asked = (
            f"target_epsilon = {run.target_epsilon:g}, which needs noise_multiplier = "
            f"{noise:.4g} on this site's data,"
            if run.target_epsilon > 0
            else f"noise_multiplier = {noise:g},"
        )
        return PrivacyDecision(
            False,
            f"{key}.min_noise_multiplier",
            f"the run asks for {asked} below this site's minimum "
            f"{budget.min_noise_multiplier:g} ({key}.min_noise_multiplier); ask for a "
            "smaller target_epsilon or more noise",
        )
    name = "clipping_norm" if run.mode == "update" else "max_grad_norm"
    if run.clipping > budget.max_clipping_norm:
        return PrivacyDecision(
            False,
            f"{key}.max_clipping_norm",
            f"the run asks for {name} = {run.clipping:g}, above this site's maximum "
            f"{budget.max_clipping_norm:g} ({key}.max_clipping_norm)",
        )
    if run.target_delta > budget.delta:
        return PrivacyDecision(
            False,
            f"{key}.delta",
            f"the run asks for target_delta = {run.target_delta:g}, above this site's "
            f"delta {budget.delta:g} ({key}.delta)",
        )
    return PrivacyDecision(True)
