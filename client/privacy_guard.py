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

The ledger is bound to the site's audit log (``medfed.client.ledger_audit.check_ledger``):
checked at daemon start (:meth:`PrivacyGate.check_at_start`) and before every DP round
and DP join. A missing, replaced, older or damaged ledger refuses every DP round and
join under the rule ``privacy.ledger``, saying what happened and the fix
(:func:`rebuild_ledger`, ``medfed site budget --rebuild-from-audit``); runs without DP
go on. Every reservation is audited (``privacy-reserved``) before training, so a
rebuild counts it; a join holds the run's planned epsilon (``privacy-hold``) until the
run ends (:meth:`PrivacyGate.release`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.audit import AuditLog
from medfed.client.ledger import (
    BudgetExceeded,
    Hold,
    LedgerError,
    LedgerUntrusted,
    PrivacyLedger,
    Reservation,
    RunTargetExceeded,
    UnitNotCovered,
)
from medfed.client.ledger_audit import (
    AuditedSpends,
    RebuildResult,
    build_from_audit,
    check_ledger,
)
from medfed.core import privacy_accounting
from medfed.core.config import RunConfig, SiteConfig, resolve
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.privacy import DatasetBudget, check_run_against_policy
from medfed.core.privacy_accounting import HistoryEntry
from medfed.core.schema import PrivacyReport
from medfed.tasks import dp_update, dp_validation

#: Relative precision of a noise multiplier fitted to a remaining budget (on the safe side).
FIT_TOLERANCE = 5e-3
#: The rule a refusal names when the ledger cannot be trusted.
LEDGER_RULE = "privacy.ledger"

log = logging.getLogger("medfed.site")


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
    #: The ledger that holds the reservation (the audit log names it).
    ledger_id: str = ""

    def record(self, run: RunConfig, steps: int) -> dict[str, Any]:
        """The privacy part of the audit record and of the reply's metrics."""
        if self.reservation is None:
            return {"mode": self.mode}
        r = self.reservation
        return {
            "mode": self.mode,
            "dataset": self.dataset,
            "epsilon_round": r.epsilon,
            "epsilon_run": r.run_epsilon,
            "epsilon_spent": r.spent,
            "epsilon_remaining": r.remaining,
            "delta": run.privacy.target_delta,
            "accountant": run.privacy.accountant,
            "noise_multiplier": self.noise_multiplier,
            "noise_fitted_to_budget": self.fitted,
            "target_epsilon": run.privacy.target_epsilon,
            "unit": run.privacy.unit if self.mode == "sample" else "site",
            "clipping": run.privacy.clipping,
            "sample_rate": self.history[-1][1] if self.history else 0.0,
            "steps": steps,
            "ledger_id": self.ledger_id,
            "ledger_record": r.record_id,
        }

    def metrics(self) -> dict[str, float]:
        """Epsilon figures for the coordinator (per site, per round)."""
        if self.reservation is None:
            return {}
        r = self.reservation
        return PrivacyReport(
            epsilon=r.epsilon,
            epsilon_run=r.run_epsilon,
            epsilon_remaining=r.remaining,
            noise_multiplier=self.noise_multiplier,
        ).metrics()


@dataclass(frozen=True)
class Forecast:
    """What a site tells the coordinator when it joins a run (:meth:`PrivacyGate.preflight`)."""

    #: How many of the run's remaining rounds the budget covers.
    rounds: int
    #: The noise multiplier this site will add.
    noise_multiplier: float
    #: True when that is more than the run asks, to fit the site's remaining budget.
    fitted: bool = False
    #: Rounds of the run charged before (a resumed run's): the budget covers the run up
    #: to round ``charged + rounds``.
    charged: int = 0

    @property
    def last_round(self) -> int:
        """The last round of the run this site's budget covers."""
        return self.charged + self.rounds


@dataclass(frozen=True)
class _Plan:
    dataset: str
    budget: DatasetBudget
    noise: float
    entry: HistoryEntry
    fitted: bool


class PrivacyGate:
    """The site's privacy policy and ledger, the ledger checked against the audit log."""

    def __init__(
        self, config: SiteConfig, config_path: Path, *, audit: AuditLog | None = None
    ) -> None:
        self.policy = config.privacy
        self.config_path = Path(config_path)
        self.ledger_path = resolve(config_path, config.privacy.ledger)
        self.audit = audit or AuditLog(resolve(config_path, config.site.audit_log))
        self._ledger: PrivacyLedger | None = None
        # what the audit log says so far, read on from byte _audit_at of inode _audit_ino
        self._audited = AuditedSpends()
        self._audit_at = 0
        self._audit_ino: int | None = None

    @property
    def ledger(self) -> PrivacyLedger:
        """The ledger, opened and checked against the audit log on first use."""
        if self._ledger is None:
            self._ledger = self._bound_ledger()
        return self._ledger

    def _read_audit(self) -> AuditedSpends:
        """The audit log's spends and ledger identity, read on from where it was read last."""
        try:
            st = os.stat(self.audit.path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_ino != self._audit_ino or st.st_size < self._audit_at:
            self._audited, self._audit_at = AuditedSpends(), 0  # a new (or cut) file
            self._audit_ino = None if st is None else st.st_ino
        records, self._audit_at = self.audit.read_from(self._audit_at)
        for record in records:
            self._audited.add(record)
        return self._audited

    def _bound_ledger(self) -> PrivacyLedger:
        """The ledger, if it holds every spend the audit log records; else LedgerUntrusted.

        A site that has spent nothing gets a new ledger (``ledger-created``); a ledger the
        audit log does not name yet (written before the binding) is adopted
        (``ledger-adopted``). Never a new ledger where the audit log expects one.
        """
        audited = self._read_audit()
        ledger = check_ledger(self.ledger_path, audited, config=self.config_path)
        if ledger is None:
            ledger = PrivacyLedger(self.ledger_path, config=self.config_path)
            self.audit.record(
                "ledger-created", ledger_id=ledger.ledger_id, path=str(self.ledger_path)
            )
        elif audited.ledger_id is None:
            spent = {d.dataset: d.spent for d in ledger.summary().datasets}
            self.audit.record(
                "ledger-adopted",
                ledger_id=ledger.ledger_id,
                path=str(self.ledger_path),
                spent=spent,
            )
        self._ledger = ledger
        return ledger

    def _require_ledger(self) -> PrivacyLedger:
        """Before a DP round or join: the bound ledger, or the refusal that says why not."""
        try:
            return self._bound_ledger()
        except LedgerUntrusted as exc:
            raise PrivacyRefusal(LEDGER_RULE, _ledger_reason(exc)) from None

    def check_at_start(self) -> LedgerError | None:
        """At daemon start: check the ledger against the audit log; the problem, or None.

        A site without privacy budgets has no ledger to check. A problem is logged and
        audited (``ledger-refused``); the daemon still starts: runs without DP go on,
        DP rounds are refused until the ledger is restored.
        """
        if not self.policy.datasets:
            return None
        try:
            self._bound_ledger()
        except LedgerError as exc:
            log.error("%s", exc)
            self.audit.record(
                "ledger-refused",
                rule=LEDGER_RULE,
                reason=exc.what,
                fix=exc.fix,
                path=str(self.ledger_path),
            )
            return exc
        return None

    def release(self, run_id: str, *, reason: str) -> list[Hold]:
        """The run ended (or left): its holds no longer keep epsilon from other runs."""
        if not self.ledger_path.exists():
            return []
        try:
            released = self._bound_ledger().release(run_id)
        except LedgerError as exc:  # nothing to release from a ledger that cannot be read
            log.warning("could not release the holds of run %s: %s", run_id, exc.what)
            return []
        for h in released:
            self.audit.record(
                "privacy-hold-released",
                run_id=run_id,
                dataset=h.dataset,
                epsilon=h.epsilon,
                unspent=h.outstanding,
                reason=reason,
            )
        return released

    def before_training(
        self,
        run: RunConfig,
        run_id: str,
        rnd: int,
        *,
        model: Any,
        num_examples: int,
        batch_size: int,
        epochs: int,
    ) -> RoundPrivacy:
        """Check policy, validate the model, reserve the round's epsilon; or refuse.

        ``num_examples`` counts the units DP-SGD samples from (``dp_units.privacy_units``):
        training examples, or the scans or patients ``privacy.unit`` names.
        """
        plan = self._plan(
            run,
            run_id,
            model=model,
            num_examples=num_examples,
            batch_size=batch_size,
            epochs=epochs,
        )
        if isinstance(plan, RoundPrivacy):
            return plan
        with _ledger_refusals(plan.dataset):
            reservation = self.ledger.reserve(
                run_id,
                rnd,
                plan.dataset,
                budget=plan.budget,
                round_history=[plan.entry],
                delta=run.privacy.target_delta,
                accountant=run.privacy.accountant,
                mode=run.privacy.mode,
                unit=run.privacy.unit,
                run_epsilon_max=run.privacy.target_epsilon or None,
            )
            spend = self.ledger.record(reservation.record_id)
        # audited before training: a ledger rebuilt from the audit log counts this round
        # even if the site dies before it is sent
        self.audit.record(
            "privacy-reserved",
            run_id=run_id,
            round=rnd,
            dataset=plan.dataset,
            ledger_id=self.ledger.ledger_id,
            record=spend.id,
            mode=spend.mode,
            unit=spend.unit,
            epsilon=spend.epsilon,
            epsilon_run=reservation.run_epsilon,
            delta=spend.delta,
            accountant=spend.accountant,
            noise_multiplier=spend.noise_multiplier,
            sample_rate=spend.sample_rate,
            steps=spend.steps,
            history=[list(plan.entry)],
            reserved_at=spend.reserved_at,
        )
        return RoundPrivacy(
            run.privacy.mode,
            plan.dataset,
            plan.budget,
            reservation,
            [plan.entry],
            plan.noise,
            plan.fitted,
            self.ledger.ledger_id,
        )

    def preflight(
        self,
        run: RunConfig,
        run_id: str,
        *,
        model: Any,
        num_examples: int,
        batch_size: int,
        epochs: int,
    ) -> Forecast | None:
        """Refuse, before anyone trains, a run this site would refuse in its first round.

        The checks of :meth:`before_training` (policy, model, privacy unit, budget) for
        the run's next round, charging nothing: under secure aggregation a site refusing
        a round can cost the sites that trained it their round, and their epsilon with it.
        Returns how many of the run's remaining rounds the budget covers and the noise
        this site will add (``None`` when no budget applies); fewer rounds than all means
        the site will refuse the rest, which the coordinator hears now. Each round is
        still reserved by :meth:`before_training`.

        The epsilon of the rounds covered is held for the run (``privacy-hold``): another
        run joining while this one lives is admitted only if it fits beside it. A refused
        join releases what the same run held before.
        """
        try:
            return self._forecast(
                run,
                run_id,
                model=model,
                num_examples=num_examples,
                batch_size=batch_size,
                epochs=epochs,
            )
        except PrivacyRefusal:
            self.release(run_id, reason="refused at a join")
            raise

    def _forecast(
        self,
        run: RunConfig,
        run_id: str,
        *,
        model: Any,
        num_examples: int,
        batch_size: int,
        epochs: int,
    ) -> Forecast | None:
        plan = self._plan(
            run,
            run_id,
            model=model,
            num_examples=num_examples,
            batch_size=batch_size,
            epochs=epochs,
        )
        if isinstance(plan, RoundPrivacy):
            return None
        charged = self.ledger.rounds_charged(run_id, plan.dataset)
        rounds_left = run.rounds - charged
        if rounds_left <= 0:  # the ledger refuses further rounds
            return Forecast(0, plan.noise, plan.fitted, charged)

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
            covered = rounds_left
        else:
            low, high = 1, rounds_left - 1  # fits(low); the largest k that fits is in [low, high]
            while low < high:
                mid = (low + high + 1) // 2
                low, high = (mid, high) if fits(mid) else (low, mid - 1)
            covered = low
        self._hold(run, run_id, plan, covered)
        return Forecast(covered, plan.noise, plan.fitted, charged)

    def _hold(self, run: RunConfig, run_id: str, plan: _Plan, rounds: int) -> None:
        """Hold the epsilon of the ``rounds`` the run will spend here, from other runs."""
        with _ledger_refusals(plan.dataset):
            hold = self.ledger.hold(
                run_id,
                plan.dataset,
                budget=plan.budget,
                plan=[plan.entry] * rounds,
                delta=run.privacy.target_delta,
                accountant=run.privacy.accountant,
                mode=run.privacy.mode,
                unit=run.privacy.unit,
                run_epsilon_max=run.privacy.target_epsilon or None,
                rounds=rounds,
                round_timeout_s=run.round_timeout_s,
            )
        self.audit.record(
            "privacy-hold",
            run_id=run_id,
            dataset=hold.dataset,
            epsilon=hold.epsilon,
            unspent=hold.outstanding,
            rounds=hold.rounds,
            round_timeout_s=run.round_timeout_s,
            expires=hold.expires,
        )

    def _check(self, run: RunConfig, run_id: str, plan: _Plan, rounds: int) -> None:
        """The ledger's checks for ``rounds`` more rounds like ``plan``; raises its refusals."""
        self.ledger.check_plan(
            run_id,
            plan.dataset,
            budget=plan.budget,
            plan=[plan.entry] * rounds,
            delta=run.privacy.target_delta,
            accountant=run.privacy.accountant,
            mode=run.privacy.mode,
            unit=run.privacy.unit,
            run_epsilon_max=run.privacy.target_epsilon or None,
            rounds=rounds,
        )

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
            guess = self._first_guess(run, run_id, plan, rounds_left)
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

    def _first_guess(self, run: RunConfig, run_id: str, plan: _Plan, rounds: int) -> float:
        """The noise whose ``rounds`` rounds spend what the dataset has left (or the target)."""
        left = self.ledger.remaining(plan.dataset, plan.budget) - self.ledger.held(
            plan.dataset, exclude=run_id
        )
        target = min(left, run.privacy.target_epsilon or left)
        _, rate, steps = plan.entry
        try:
            return privacy_accounting.noise_for_target(
                target,
                run.privacy.target_delta,
                sample_rate=rate,
                steps=steps * rounds,
                accountant=run.privacy.accountant,
            )
        except ValueError:  # nothing left, or no noise reaches it: bisect instead
            return 0.0

    def _plan(
        self,
        run: RunConfig,
        run_id: str,
        *,
        model: Any,
        num_examples: int,
        batch_size: int,
        epochs: int,
    ) -> RoundPrivacy | _Plan:
        """The round's dataset, budget, noise and accountant entry; or a round without DP."""
        mode = run.privacy.mode
        if not self.policy.datasets:
            if mode == "off":
                return RoundPrivacy(mode)  # the site declares no budget and requires no DP
            raise PrivacyRefusal(
                "privacy.datasets", "the run asks for DP but this site has no privacy budget"
            )
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
            ((_, sample_rate, steps),) = privacy_accounting.plan_round(
                num_examples, batch_size=batch_size, epochs=epochs, noise_multiplier=1.0
            )
        else:  # update-level: one Gaussian mechanism on the clipped update per round
            sample_rate, steps = 1.0, 1
        noise = site_noise_multiplier(run, sample_rate=sample_rate, steps_per_round=steps)
        decision = check_run_against_policy(
            run.privacy, budget, dataset=name, noise_multiplier=noise
        )
        if not decision.allowed:
            raise PrivacyRefusal(decision.rule, decision.reason)
        if mode == "sample":
            try:
                dp_validation.validate_for_dp(model)
            except MedfedError as exc:
                raise PrivacyRefusal("task model", str(exc)) from None
        self._require_ledger()  # before every DP round and join: refused if untrusted
        plan = _Plan(name, budget, noise, (noise, sample_rate, steps), False)
        if not budget.max_fitted_noise_multiplier:
            return plan
        with _ledger_refusals(name):
            return self._fit(run, run_id, plan)

    def commit(self, rp: RoundPrivacy, *, steps: int) -> None:
        """Mark the reserved spend committed; more steps than reserved blocks the reply."""
        if rp.reservation is not None:
            self.ledger.commit(
                rp.reservation.record_id, steps=steps if rp.mode == "sample" else None
            )


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
    except LedgerUntrusted as exc:  # damaged or removed since the round's check
        raise PrivacyRefusal(LEDGER_RULE, _ledger_reason(exc)) from None


def _ledger_reason(exc: LedgerError) -> str:
    """What the coordinator reads: what happened to the ledger and the site's fix."""
    return f"{exc.what} Fix at the site: {exc.fix}."


@dataclass(frozen=True)
class Rebuilt:
    """What :func:`rebuild_ledger` did."""

    result: RebuildResult
    path: Path
    problem: str  # why the ledger needed it
    kept_aside: list[Path]


def rebuild_ledger(config: SiteConfig, config_path: Path) -> Rebuilt:
    """Restore the site's ledger from its audit log (``medfed site budget --rebuild-from-audit``).

    Only when the ledger cannot be trusted (missing, replaced, older than the audit log,
    damaged) and the audit log's chain is intact. The old file (and its WAL files) is
    kept aside as ``ledger.sqlite.damaged-<UTC time>``, never deleted; the new ledger
    (:func:`medfed.client.ledger_audit.build_from_audit`) is named in the audit log by a
    ``ledger-rebuilt`` record before it is put in place.
    """
    config_path = Path(config_path)
    audit = AuditLog(resolve(config_path, config.site.audit_log))
    path = resolve(config_path, config.privacy.ledger)
    verified = audit.verify()
    if not verified.intact:
        first = verified.breaks[0]
        raise LedgerError(
            f"The audit log's hash chain is broken ({len(verified.breaks)} break(s), the first "
            f"at line {first.line}: {first.what}); a ledger rebuilt from it could miss spends.",
            where=str(audit.path),
            fix=f"restore the audit log from a backup (`medfed site audit --config "
            f"{config_path} --verify` lists the breaks), then rebuild again",
        )
    records = audit.read()
    try:
        check_ledger(path, AuditedSpends.of(records), config=config_path)
    except LedgerUntrusted as exc:
        problem = exc.problem
    else:
        raise LedgerError(
            "The privacy ledger matches the audit log: there is nothing to rebuild."
            if path.exists()
            else "There is no privacy ledger and the audit log records no "
            "spend: there is nothing to rebuild (the site makes a new ledger when it needs one).",
            where=str(path),
            fix="none needed; `medfed site budget` shows what was spent",
        )
    tmp = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    result = build_from_audit(tmp, records, budgets=config.privacy.datasets)
    try:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        aside = []
        for suffix in ("", "-wal", "-shm", "-journal"):  # a WAL left beside the new file
            old = path.with_name(path.name + suffix)  # would be replayed into it: moved too
            if old.exists():
                kept = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
                os.rename(old, kept)
                aside.append(kept)
        audit.record(
            "ledger-rebuilt",
            ledger_id=result.ledger_id,
            path=str(path),
            problem=problem,
            kept_aside=[str(a) for a in aside],
            restored={
                d.dataset: {
                    "epsilon": d.epsilon,
                    "runs": d.runs,
                    "rounds": d.rounds,
                    "unsent": d.unsent,
                }
                for d in result.datasets
            },
            holds=[list(h) for h in result.holds],
            legacy_spends=result.legacy,
        )
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Rebuilt(result, path, problem, aside)


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
        derived = privacy_accounting.noise_for_target(
            p.target_epsilon,
            p.target_delta,
            sample_rate=sample_rate,
            steps=steps_per_round * run.rounds,
            accountant=p.accountant,
        )
    except ValueError as exc:
        raise PrivacyRefusal("privacy.target_epsilon", str(exc)) from None
    return max(derived, p.noise_multiplier)


def noised_update(
    global_vec: np.ndarray, local_vec: np.ndarray, run: RunConfig, noise_multiplier: float
) -> np.ndarray:
    """Update-level DP: global + clip-and-noise(local - global), noise from ChaCha20."""
    delta = local_vec.astype(np.float64) - global_vec.astype(np.float64)
    noised = dp_update.clip_and_noise_update(
        delta, clipping_norm=run.privacy.clipping_norm, noise_multiplier=noise_multiplier
    )
    return (global_vec.astype(np.float64) + noised).astype(np.float32)
