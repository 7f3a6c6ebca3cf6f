"""Privacy accounting: epsilon of DP-SGD and update-level DP histories (Opacus's accountants).

Pure math shared by the site (its ledger, its forecasts) and the server (fitting a
run's noise): nothing here trains. A history is what Opacus's accountants keep,
``[(noise_multiplier, sample_rate, steps), ...]``; nothing re-derives privacy math.
Opacus is imported where a figure is asked for (it costs a process ~1 s to import).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

from medfed.core.errors import MedfedError

AccountantName = Literal["rdp", "prv"]
#: One accountant history entry, as Opacus keeps it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]


def plan_round(
    num_examples: int, *, batch_size: int, epochs: int, noise_multiplier: float
) -> list[HistoryEntry]:
    """The accountant history one DP-SGD call (``dp_train``) will produce, known beforehand.

    Opacus's Poisson loader samples at ``q = 1 / len(DataLoader)`` for
    ``len(DataLoader) = ceil(n / batch_size)`` steps per epoch.
    """
    if num_examples <= 0:
        raise ValueError("cannot train with DP on an empty dataset")
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return [(float(noise_multiplier), 1.0 / steps_per_epoch, steps_per_epoch * epochs)]


def _accountant(name: AccountantName) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise MedfedError(
        f"Unknown privacy accountant {name!r}.",
        expected="'rdp' or 'prv'",
        fix="set privacy.accountant = 'rdp' (or 'prv') in the run configuration",
    )


def epsilon_of_history(
    history: Sequence[HistoryEntry], delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon of a whole accountant history at ``delta`` (Opacus's accountant); 0 if empty.

    Consecutive entries of the same noise and sampling rate are merged first, as
    Opacus's accountants merge them on ``step()``: a run's rounds then give the
    history one long training would, and PRV discretizes one entry, not one per round.
    """
    entries: list[HistoryEntry] = []
    for z, q, s in history:
        if int(s) <= 0:
            continue
        if entries and entries[-1][:2] == (float(z), float(q)):
            entries[-1] = (float(z), float(q), entries[-1][2] + int(s))
        else:
            entries.append((float(z), float(q), int(s)))
    if not entries:
        return 0.0
    acc = _accountant(accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at ``delta``."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_target(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    accountant: AccountantName = "rdp",
) -> float:
    """The smallest noise multiplier within ``(target_epsilon, delta)`` after ``steps``.

    The steps are Poisson-subsampled Gaussian steps at ``sample_rate``; Opacus's
    ``get_noise_multiplier`` searches. Its binary search returns the upper end of its
    bracket, so the result's epsilon is at most the target (within 0.01 below it).
    """
    return _noise_for_target(
        float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant
    )


@functools.lru_cache(maxsize=64)
def _noise_for_target(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName
) -> float:
    # Cached: a site asks the same question every round of a run (PRV takes seconds).
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as exc:  # "The privacy budget is too low."
        raise ValueError(
            f"no noise multiplier up to 1e6 keeps {steps} steps at sampling rate "
            f"{sample_rate:g} within epsilon {target_epsilon:g} (delta {delta:g}): {exc} "
            "Ask for a larger target_epsilon, fewer rounds or local epochs, or a larger batch."
        ) from None


def epsilon_of_round(
    history_so_far: Sequence[HistoryEntry],
    round_history: Sequence[HistoryEntry],
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Epsilon one more round adds to a run: eps(history + round) - eps(history).

    The accountant composes the run's whole history (tighter than summing
    per-round epsilons); the increments of a run's rounds add up to its epsilon,
    so a ledger can sum them. Call it before training with :func:`plan_round`.
    """
    before = epsilon_of_history(history_so_far, delta, accountant)
    after = epsilon_of_history([*history_so_far, *round_history], delta, accountant)
    return max(after - before, 0.0)


def epsilon_for_update_dp(
    rounds: int, sampling_fraction: float, noise_multiplier: float, delta: float
) -> float:
    """User-level epsilon of a site's whole dataset after ``rounds`` noised updates.

    Each round is a Gaussian mechanism on the clipped update (sensitivity
    ``clipping_norm``, noise multiplier ``noise_multiplier``), subsampled with
    probability ``sampling_fraction``; Opacus's RDP accountant composes them.
    A site charging its own ledger should pass ``sampling_fraction = 1.0``: it
    cannot verify the server's sampling, and it knows when it takes part.
    """
    return epsilon_for(rounds, sampling_fraction, noise_multiplier, delta, "rdp")
