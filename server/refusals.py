"""When sites' refusals end a run, and what the coordinator is told.

A site refuses a round under a rule of its own ``site.toml`` (its privacy budget, the
noise it requires, the tasks it allows). Such a refusal repeats every later round of
the same run: the site has not spent, so it asks the same of its budget again. A run
whose rounds can no longer produce a model because of refusals therefore ends at once,
cleanly, with every site's rule and reason, instead of going through its remaining
rounds without training and reporting the untrained model as "completed". A site that
*failed* (a crash, a timeout) may succeed next round, so failures never end a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medfed.core.errors import MedfedError
from medfed.core.schema import SiteError


class SitesRefused(MedfedError):
    """The sites' refusals leave a round of this run without a model; the run ends."""

    def __init__(self, rnd: int, phase: str, refusals: dict[str, SiteError], why: str) -> None:
        self.round, self.phase, self.refusals = rnd, phase, refusals
        listed = "\n".join(
            f"    {site} [{e.rule or 'policy'}]: {e.reason}" for site, e in sorted(refusals.items())
        )
        when = f"Round {rnd} ({phase})" if rnd else "Set-up, before any site trained"
        super().__init__(
            f"{when}: {why}; a refusal repeats every round, so the run ends.\n{listed}",
            where="the refusing sites' site.toml rules named above",
            expected="a run every site's policy and remaining budget allow",
            fix="ask for what the rules allow (more noise, fewer rounds, a smaller "
            "--target-epsilon, another task or strategy), leave those sites out, or ask "
            "their operators; `medfed site budget` shows a site's remaining epsilon",
        )


@dataclass
class RefusalPolicy:
    """When refusals end a run: the sites' error replies per round, and the rule over them.

    One object per run, given to the grid wrapper (which records each site's error
    reply) and to the secure-aggregation strategy (which records the refusals a site's
    join forecast implies, and asks whether a shortfall ends the run); neither reaches
    into the other for it.
    """

    refusals: dict[int, dict[str, SiteError]] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)

    def add(self, rnd: int, site: str, error: SiteError | None) -> None:
        """Record ``site``'s error reply in round ``rnd`` (None: not a site error we can read)."""
        if error is not None and error.status == "refused":
            self.refusals.setdefault(rnd, {})[site] = error
        else:
            self.failures[rnd] = self.failures.get(rnd, 0) + 1

    def end_if_refused(self, rnd: int, phase: str, why: str) -> None:
        """Raise :class:`SitesRefused` when round ``rnd`` fell short through refusals alone.

        Called once the round is known to have no result (``why``). Any failure in the
        round (which may not repeat) keeps the run going.
        """
        refused = self.refusals.get(rnd, {})
        if refused and not self.failures.get(rnd):
            raise SitesRefused(rnd, phase, dict(refused), why)
