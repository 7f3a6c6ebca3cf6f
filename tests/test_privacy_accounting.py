"""Epsilon comes from Opacus's accountants; update-level clipping and noise."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medfed.core import privacy_accounting
from medfed.tasks import dp_update

# (sample_rate, noise_multiplier, steps, delta) -> epsilon, computed once with
# Opacus 1.6 compute_rdp/get_privacy_spent over RDPAccountant.DEFAULT_ALPHAS.
GOLDEN = [
    (0.01, 1.1, 1000, 1e-5, 1.7117700912203435),
    (16 / 150, 1.0, 95, 1e-5, 8.229692234056028),
    (1.0, 2.0, 10, 1e-5, 8.079406222420491),
]


def _independent(q: float, z: float, steps: int, delta: float) -> float:
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@pytest.mark.parametrize(("q", "z", "steps", "delta", "golden"), GOLDEN)
def test_epsilon_equals_an_independent_opacus_computation(
    q: float, z: float, steps: int, delta: float, golden: float
) -> None:
    eps = privacy_accounting.epsilon_for(steps, q, z, delta, "rdp")
    assert eps == pytest.approx(_independent(q, z, steps, delta), rel=1e-12)
    assert eps == pytest.approx(golden, rel=1e-9)  # drift of Opacus's analysis


def test_prv_accountant_is_tighter_than_rdp_here() -> None:
    prv = privacy_accounting.epsilon_for(1000, 0.01, 1.1, 1e-5, "prv")
    assert 0 < prv < privacy_accounting.epsilon_for(1000, 0.01, 1.1, 1e-5, "rdp")


def test_round_epsilon_composes_over_the_run_history() -> None:
    h = [(1.0, 0.1, 10)]
    one = privacy_accounting.epsilon_of_round([], h, 1e-5)
    second = privacy_accounting.epsilon_of_round(h, h, 1e-5)
    assert one == pytest.approx(privacy_accounting.epsilon_for(10, 0.1, 1.0, 1e-5))
    # the two increments add up to the accountant's epsilon of the whole run,
    # which is less than twice one round (composition beats summing)
    assert one + second == pytest.approx(privacy_accounting.epsilon_for(20, 0.1, 1.0, 1e-5))
    assert one + second < 2 * one


def test_plan_round_matches_opacus_poisson_loader() -> None:
    assert privacy_accounting.plan_round(150, batch_size=16, epochs=2, noise_multiplier=1.2) == [
        (1.2, 1 / 10, 20)
    ]


def test_update_dp_epsilon_is_the_rdp_accountant() -> None:
    assert privacy_accounting.epsilon_for_update_dp(50, 1.0, 3.0, 1e-5) == pytest.approx(
        _independent(1.0, 3.0, 50, 1e-5)
    )


def test_clip_and_noise_bounds_the_norm_and_has_the_right_std() -> None:
    rng = np.random.default_rng(0)
    update = rng.normal(size=20_000).astype(np.float32) * 10
    clipped = dp_update.clip_and_noise_update(
        update, clipping_norm=1.0, noise_multiplier=0.0, generator=np.random.default_rng(1)
    )
    assert clipped.dtype == np.float32
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(
        clipped / np.linalg.norm(clipped), update / np.linalg.norm(update), rtol=1e-4, atol=1e-7
    )
    small = np.full(4, 0.1, dtype=np.float32)  # norm 0.2 < 1: left as is
    np.testing.assert_allclose(
        dp_update.clip_and_noise_update(
            small, clipping_norm=1.0, noise_multiplier=0.0, generator=np.random.default_rng(1)
        ),
        small,
    )
    zero = np.zeros(200_000)
    noised = dp_update.clip_and_noise_update(
        zero, clipping_norm=0.5, noise_multiplier=2.0, generator=np.random.default_rng(2)
    )
    # std 1.0 = 2.0 * 0.5; the sample std of 2e5 draws is within ~0.3% (5 sigma: 1.6%)
    assert noised.std() == pytest.approx(1.0, rel=0.016)
    assert abs(noised.mean()) < 5 / np.sqrt(200_000)
    assert update[0] != clipped[0]  # the caller's array is not mutated
    assert np.all(
        update == rng.__class__(np.random.PCG64(0)).normal(size=20_000).astype(np.float32) * 10
    )


def test_clip_and_noise_refuses_a_non_finite_update() -> None:
    from medfed.core.errors import MedfedError

    with pytest.raises(MedfedError, match="NaN"):
        dp_update.clip_and_noise_update(
            np.array([1.0, np.nan]),
            clipping_norm=1.0,
            noise_multiplier=1.0,
            generator=np.random.default_rng(0),
        )


def test_the_coordinator_is_warned_when_update_level_noise_drowns_the_update() -> None:
    from medfed.core.config import RunConfig
    from medfed.server.app import _update_dp_warning

    few = RunConfig(
        task="tiny-seg",
        min_sites=2,
        privacy={"mode": "update", "noise_multiplier": 1.0, "clipping_norm": 1.0},
    )
    text = _update_dp_warning(few, 20_000)  # noise 1 * sqrt(20000 / 2) = 100x the update
    assert text is not None and "still about 100 times the largest update" in text
    assert "--dp sample" in text
    many = few.model_copy(update={"min_sites": 1000})
    assert _update_dp_warning(many, 100) is None  # sqrt(100 / 1000) < 1: the mean is signal
    sample = RunConfig(task="tiny-seg", privacy={"mode": "sample", "noise_multiplier": 1.0})
    assert _update_dp_warning(sample, 20_000) is None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_run_of_equal_rounds_is_accounted_as_one_long_training(accountant: str) -> None:
    # Opacus's accountant, stepped 60 times at one noise and rate, keeps one entry;
    # ten rounds of six steps must give its epsilon, not a coarser composition.
    rounds = [(0.9, 0.05, 6)] * 10
    assert privacy_accounting.epsilon_of_history(rounds, 1e-5, accountant) == pytest.approx(
        privacy_accounting.epsilon_for(60, 0.05, 0.9, 1e-5, accountant), rel=1e-12
    )
    # a round at another noise in between is its own entry: not merged across it
    mixed = [*rounds[:5], (2.0, 0.05, 6), *rounds[5:]]
    assert privacy_accounting.epsilon_of_history(
        mixed, 1e-5, accountant
    ) < privacy_accounting.epsilon_for(66, 0.05, 0.9, 1e-5, accountant)
