"""The site's privacy gate around one training round.

Before training: the run's privacy settings are checked against the site's own
policy (a run cannot loosen it), the model is validated for DP, and the round's
epsilon is reserved in the persistent ledger (a refusal if it does not fit the
remaining budget). After training, before the reply leaves: the reservation is
committed. A reserved round stays charged even if the site crashes before
sending (never under-counts). When a site joins a run under secure aggregation, the
same checks run first for the run's next round and then for its remaining rounds
(:meth:`PrivacyGate.preflight`): a refusal then comes before anyone has trained.
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
        plan = self._plan(run, model=model, num_examples=num_examples, batch_size=batch_size,
                          epochs=epochs)
        if isinstance(plan, RoundPrivacy):
            return plan
        name, budget, noise, entry = plan
        with _ledger_refusals(name):
            reservation = self.ledger.reserve(
                run_id, rnd, name, budget=budget, round_history=[entry],
                delta=run.privacy.target_delta, accountant=run.privacy.accountant,
                mode=run.privacy.mode, unit=run.privacy.unit,
                run_epsilon_max=run.privacy.target_epsilon or None)
        return RoundPrivacy(run.privacy.mode, name, budget, reservation, [entry], noise)

    def preflight(self, run: RunConfig, run_id: str, *, model: Any, num_examples: int,
                  batch_size: int, epochs: int) -> int | None:
        """Refuse, before anyone trains, a run this site would refuse in its first round.

        The checks of :meth:`before_training` (policy, model, privacy unit, budget) for
        the run's next round, writing nothing: under secure aggregation a site refusing
        a round can cost the sites that trained it their round, and their epsilon with it.
        Returns how many of the run's remaining rounds the budget covers (``None`` when
        no budget applies); fewer than all means the site will refuse the rest, which
        the coordinator hears now. Each round is still reserved by :meth:`before_training`.
        """
        plan = self._plan(run, model=model, num_examples=num_examples, batch_size=batch_size,
                          epochs=epochs)
        if isinstance(plan, RoundPrivacy):
            return None
        name, budget, _, entry = plan
        rounds_left = run.rounds - self.ledger.rounds_charged(run_id, name)
        if rounds_left <= 0:
            return 0  # the ledger refuses any further round itself

        def fits(k: int) -> bool:
            with _ledger_refusals(name):
                try:
                    self.ledger.check_plan(
                        run_id, name, budget=budget, plan=[entry] * k,
                        delta=run.privacy.target_delta, accountant=run.privacy.accountant,
                        mode=run.privacy.mode, unit=run.privacy.unit,
                        run_epsilon_max=run.privacy.target_epsilon or None, rounds=k)
                except BudgetExceeded:
                    if k == 1:
                        raise  # not even the next round: refused
                    return False
            return True

        fits(1)
        if rounds_left == 1 or fits(rounds_left):
            return rounds_left
        low, high = 1, rounds_left - 1  # fits(low); the largest k that fits lies in [low, high]
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    def _plan(self, run: RunConfig, *, model: Any, num_examples: int, batch_size: int,
              epochs: int) -> RoundPrivacy | tuple[str, DatasetBudget, float, HistoryEntry]:
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
        return name, budget, noise, (noise, sample_rate, steps)

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
