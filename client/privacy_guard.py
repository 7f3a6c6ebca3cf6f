"""The site's privacy gate around one training round.

Before training: the run's privacy settings are checked against the site's own
policy (a run cannot loosen it), the model is validated for DP, and the round's
epsilon is reserved in the persistent ledger (a refusal if it does not fit the
remaining budget). After training, before the reply leaves: the reservation is
committed. A reserved round stays charged even if the site crashes before
sending (never under-counts). When a site joins a run under secure aggregation, the
same checks run first for the run's next round and then for its remaining rounds
(:meth:`PrivacyGate.preflight`): a refusal then comes before anyone has trained.
A dataset whose policy sets ``max_fitted_noise_multiplier`` takes part in a run that
would not fit its remaining budget with more noise instead (:meth:`PrivacyGate._fit`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.ledger import (
    BudgetExceeded,
    PrivacyLedger,
    Reservation,
    RunTargetExceeded,
    UnitNotCovered,
)
from medfed.core.config import RunConfig, SiteConfig, resolve
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.privacy import DatasetBudget, check_run_against_policy
from medfed.tasks import dp
from medfed.tasks.dp import HistoryEntry

#: Relative precision of a noise multiplier fitted to a remaining budget (on the safe side).
FIT_TOLERANCE = 5e-3


class PrivacyRefusal(Exception):
    """The round may not run here; ``rule`` names the site.toml key behind it."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


@dataclass
class RoundPrivacy:
    """What the gate decided for one round (and what goes into the audit record)."""

    mode: str
    dataset: str = ""
    budget: DatasetBudget | None = None
    reservation: Reservation | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)
    #: The noise this site adds: the run's, or derived here from its target_epsilon.
    noise_multiplier: float = 0.0
    #: True when the site raised the noise to fit the run into its remaining budget.
    fitted: bool = False

    def record(self, run: RunConfig, steps: int) -> dict[str, Any]:
        """The privacy part of the audit record and of the reply's metrics."""
        if self.reservation is None:
            return {"mode": self.mode}
        r = self.reservation
        return {
            "mode": self.mode, "dataset": self.dataset, "epsilon_round": r.epsilon,
            "epsilon_run": r.run_epsilon, "epsilon_spent": r.spent,
            "epsilon_remaining": r.remaining, "delta": run.privacy.target_delta,
            "accountant": run.privacy.accountant,
            "noise_multiplier": self.noise_multiplier,
            "noise_fitted_to_budget": self.fitted,
            "target_epsilon": run.privacy.target_epsilon,
            "unit": run.privacy.unit if self.mode == "sample" else "site",
            "clipping": run.privacy.clipping, "sample_rate": self.history[-1][1]
            if self.history else 0.0, "steps": steps,
        }

    def metrics(self) -> dict[str, float]:
        """Epsilon figures for the coordinator (per site, per round)."""
        if self.reservation is None:
            return {}
        r = self.reservation
        return {"epsilon": r.epsilon, "epsilon-run": r.run_epsilon,
                "epsilon-remaining": r.remaining, "noise-multiplier": self.noise_multiplier}


@dataclass(frozen=True)
class Forecast:
    """What a site tells the coordinator when it joins a run (:meth:`PrivacyGate.preflight`)."""

    #: How many of the run's remaining rounds the budget covers.
    rounds: int
    #: The noise multiplier this site will add.
    noise_multiplier: float
    #: True when that is more than the run asks, to fit the site's remaining budget.
    fitted: bool = False


@dataclass(frozen=True)
class _Plan:
    dataset: str
    budget: DatasetBudget
    noise: float
    entry: HistoryEntry
    fitted: bool


class PrivacyGate:
    """The site's privacy policy and ledger."""

    def __init__(self, config: SiteConfig, config_path: Path) -> None:
        self.policy = config.privacy
        self.ledger_path = resolve(config_path, config.privacy.ledger)
        self._ledger: PrivacyLedger | None = None

    @property
    def ledger(self) -> PrivacyLedger:
        """The ledger, opened on first use."""
        if self._ledger is None:
            self._ledger = PrivacyLedger(self.ledger_path)
        return self._ledger

    def before_training(self, run: RunConfig, run_id: str, rnd: int, *, model: Any,
                        num_examples: int, batch_size: int, epochs: int) -> RoundPrivacy:
        """Check policy, validate the model, reserve the round's epsilon; or refuse.

        ``num_examples`` counts the units DP-SGD samples from (``dp.privacy_units``):
        training examples, or the scans or patients ``privacy.unit`` names.
        """
        plan = self._plan(run, run_id, model=model, num_examples=num_examples,
                          batch_size=batch_size, epochs=epochs)
        if isinstance(plan, RoundPrivacy):
            return plan
        with _ledger_refusals(plan.dataset):
            reservation = self.ledger.reserve(
                run_id, rnd, plan.dataset, budget=plan.budget, round_history=[plan.entry],
                delta=run.privacy.target_delta, accountant=run.privacy.accountant,
                mode=run.privacy.mode, unit=run.privacy.unit,
                run_epsilon_max=run.privacy.target_epsilon or None)
        return RoundPrivacy(run.privacy.mode, plan.dataset, plan.budget, reservation,
                            [plan.entry], plan.noise, plan.fitted)

    def preflight(self, run: RunConfig, run_id: str, *, model: Any, num_examples: int,
                  batch_size: int, epochs: int) -> Forecast | None:
        """Refuse, before anyone trains, a run this site would refuse in its first round.

        The checks of :meth:`before_training` (policy, model, privacy unit, budget) for
        the run's next round, writing nothing: under secure aggregation a site refusing
        a round can cost the sites that trained it their round, and their epsilon with it.
        Returns how many of the run's remaining rounds the budget covers and the noise
        this site will add (``None`` when no budget applies); fewer rounds than all means
        the site will refuse the rest, which the coordinator hears now. Each round is
        still reserved by :meth:`before_training`.
        """
        plan = self._plan(run, run_id, model=model, num_examples=num_examples,
                          batch_size=batch_size, epochs=epochs)
        if isinstance(plan, RoundPrivacy):
            return None
        rounds_left = run.rounds - self.ledger.rounds_charged(run_id, plan.dataset)
        if rounds_left <= 0:
            return Forecast(0, plan.noise, plan.fitted)  # the ledger refuses further rounds

        def fits(k: int) -> bool:
            with _ledger_refusals(plan.dataset):
                try:
                    self._check(run, run_id, plan, k)
                except BudgetExceeded:
                    if k == 1:
                        raise  # not even the next round: refused
                    return False
            return True

        fits(1)
        if rounds_left == 1 or fits(rounds_left):
            return Forecast(rounds_left, plan.noise, plan.fitted)
        low, high = 1, rounds_left - 1  # fits(low); the largest k that fits lies in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return Forecast(low, plan.noise, plan.fitted)

    def _check(self, run: RunConfig, run_id: str, plan: _Plan, rounds: int) -> None:
        """The ledger's checks for ``rounds`` more rounds like ``plan``; raises its refusals."""
        self.ledger.check_plan(
            run_id, plan.dataset, budget=plan.budget, plan=[plan.entry] * rounds,
            delta=run.privacy.target_delta, accountant=run.privacy.accountant,
            mode=run.privacy.mode, unit=run.privacy.unit,
            run_epsilon_max=run.privacy.target_epsilon or None, rounds=rounds)

    def _fit(self, run: RunConfig, run_id: str, plan: _Plan) -> _Plan:
        """More noise, so that the run's remaining rounds fit this dataset's remaining budget.

        Only with ``max_fitted_noise_multiplier`` set in the dataset's policy, and only
        when the run's own noise does not fit: the least noise, up to that cap, with which
        every remaining round fits both the budget and the run's ``target_epsilon`` (the
        ledger's own checks, so concurrent runs and the run's earlier rounds count). Asked
        again each round; a run's rounds keep the noise fitted first unless another run
        spent in between. More noise only ever lowers epsilon; the cap keeps a site with almost
        nothing left from sending the federation updates that are mostly noise.
        """
        cap = plan.budget.max_fitted_noise_multiplier
        rounds_left = run.rounds - self.ledger.rounds_charged(run_id, plan.dataset)
        if cap <= plan.noise or rounds_left <= 0:
            return plan

        def fits(noise: float) -> bool:
            trial = _Plan(plan.dataset, plan.budget, noise, (noise, *plan.entry[1:]), True)
            try:
                self._check(run, run_id, trial, rounds_left)
            except (BudgetExceeded, RunTargetExceeded):
                return False
            return True

        if fits(plan.noise):
            return plan  # fits as asked
        low, high = plan.noise, cap  # not fits(low); fits(high) is asked next
        history = self.ledger.run_history(run_id, plan.dataset)
        earlier = history[-1][0] if history else 0.0
        if low < earlier < high:  # this run's previous round here was fitted: keep its noise
            if fits(earlier):
                return _Plan(plan.dataset, plan.budget, earlier, (earlier, *plan.entry[1:]), True)
            low = earlier  # another run spent in between
        elif not history:  # the accountant's own answer, checked: one bisection, not many
            guess = self._first_guess(run, plan, rounds_left)
            if low < guess < high and fits(guess):
                low, high = max(low, guess * (1 - FIT_TOLERANCE)), guess
                if not fits(low):
                    return _Plan(plan.dataset, plan.budget, high, (high, *plan.entry[1:]), True)
        if not fits(high):
            return plan  # not even at the cap: the rounds that do not fit are refused as usual
        while high - low > FIT_TOLERANCE * high:
            mid = (low + high) / 2
            low, high = (low, mid) if fits(mid) else (mid, high)
        return _Plan(plan.dataset, plan.budget, high, (high, *plan.entry[1:]), True)

    def _first_guess(self, run: RunConfig, plan: _Plan, rounds: int) -> float:
        """The noise whose ``rounds`` rounds spend what the dataset has left (or the target)."""
        left = self.ledger.remaining(plan.dataset, plan.budget)
        target = min(left, run.privacy.target_epsilon or left)
        _, rate, steps = plan.entry
        try:
            return dp.noise_for_target(target, run.privacy.target_delta, sample_rate=rate,
                                       steps=steps * rounds, accountant=run.privacy.accountant)
        except ValueError:  # nothing left, or no noise reaches it: bisect instead
            return 0.0

    def _plan(self, run: RunConfig, run_id: str, *, model: Any, num_examples: int,
              batch_size: int, epochs: int) -> RoundPrivacy | _Plan:
        """The round's dataset, budget, noise and accountant entry; or a round without DP."""
        mode = run.privacy.mode
        if not self.policy.datasets:
            if mode == "off":
                return RoundPrivacy(mode)  # the site declares no budget and requires no DP
            raise PrivacyRefusal("privacy.datasets",
                                 "the run asks for DP but this site has no privacy budget")
        try:
            name, budget = self.policy.budget_for(run.dataset)
        except ConfigError as exc:
            raise PrivacyRefusal("privacy.datasets", exc.what) from None
        if mode == "off":
            decision = check_run_against_policy(run.privacy, budget, dataset=name)
            if not decision.allowed:
                raise PrivacyRefusal(decision.rule, decision.reason)
            return RoundPrivacy(mode, name, budget)
        if mode == "sample":
            (_, sample_rate, steps), = dp.plan_round(
                num_examples, batch_size=batch_size, epochs=epochs, noise_multiplier=1.0)
        else:  # update-level: one Gaussian mechanism on the clipped update per round
            sample_rate, steps = 1.0, 1
        noise = site_noise_multiplier(run, sample_rate=sample_rate, steps_per_round=steps)
        decision = check_run_against_policy(run.privacy, budget, dataset=name,
                                            noise_multiplier=noise)
        if not decision.allowed:
            raise PrivacyRefusal(decision.rule, decision.reason)
        if mode == "sample":
            try:
                dp.validate_for_dp(model)
            except MedfedError as exc:
                raise PrivacyRefusal("task model", str(exc)) from None
        plan = _Plan(name, budget, noise, (noise, sample_rate, steps), False)
        if not budget.max_fitted_noise_multiplier:
            return plan
        with _ledger_refusals(name):
            return self._fit(run, run_id, plan)

    def commit(self, rp: RoundPrivacy, *, steps: int) -> None:
        """Mark the reserved spend committed; more steps than reserved blocks the reply."""
        if rp.reservation is not None:
            self.ledger.commit(rp.reservation.record_id,
                               steps=steps if rp.mode == "sample" else None)


@contextlib.contextmanager
def _ledger_refusals(dataset: str) -> Iterator[None]:
    """The ledger's refusals as :class:`PrivacyRefusal`, each naming its rule."""
    try:
        yield
    except BudgetExceeded as exc:
        raise PrivacyRefusal(f"privacy.datasets.{dataset}.epsilon_max", exc.what) from None
    except RunTargetExceeded as exc:
        raise PrivacyRefusal("privacy.target_epsilon", exc.what) from None
    except UnitNotCovered as exc:
        raise PrivacyRefusal(f"privacy.datasets.{dataset}.privacy_unit", exc.what) from None


def site_noise_multiplier(run: RunConfig, *, sample_rate: float, steps_per_round: int) -> float:
    """The noise multiplier this site adds in ``run``.

    The run's ``noise_multiplier``, or, with ``target_epsilon``, the smallest noise that
    keeps this site's epsilon after all the run's rounds (``steps_per_round`` steps each at
    ``sample_rate``, the run's delta and accountant) at or below the target, never below
    the run's ``noise_multiplier``. A site with more data samples at a lower rate, so it
    needs less noise for the same epsilon.
    """
    p = run.privacy
    if p.target_epsilon <= 0:
        return p.noise_multiplier
    try:
        derived = dp.noise_for_target(p.target_epsilon, p.target_delta, sample_rate=sample_rate,
                                      steps=steps_per_round * run.rounds, accountant=p.accountant)
    except ValueError as exc:
        raise PrivacyRefusal("privacy.target_epsilon", str(exc)) from None
    return max(derived, p.noise_multiplier)


def noised_update(global_vec: np.ndarray, local_vec: np.ndarray, run: RunConfig,
                  noise_multiplier: float) -> np.ndarray:
    """Update-level DP: global + clip-and-noise(local - global), noise from ChaCha20."""
    delta = local_vec.astype(np.float64) - global_vec.astype(np.float64)
    noised = dp.clip_and_noise_update(delta, clipping_norm=run.privacy.clipping_norm,
                                      noise_multiplier=noise_multiplier)
    return (global_vec.astype(np.float64) + noised).astype(np.float32)
