"""The batched DP optimizer computes what Opacus's ``DPOptimizer`` computes."""

from __future__ import annotations

import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfed.tasks import dp_optimizer
from medfed.tasks.dp import make_private
from medfed.tasks.dp_optimizer import BatchedDPOptimizer, batch_optimizer_steps

BATCH = 8


def _model() -> nn.Module:
    """Small and large parameter tensors (either side of ``SMALL_TENSOR``)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 512, 3),
        nn.Flatten(),
        nn.Linear(512, 3),
    )


def _optimizers(model: nn.Module, noise: float, clip: float) -> tuple[DPOptimizer, DPOptimizer]:
    params = list(model.parameters())

    def make() -> DPOptimizer:
        return DPOptimizer(
            torch.optim.SGD(params, lr=0.1),
            noise_multiplier=noise,
            max_grad_norm=clip,
            expected_batch_size=BATCH,
        )

    return make(), batch_optimizer_steps(make())


def _grad_samples(model: nn.Module, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # per-sample scales from 0.01 to 10: some samples clipped, some not
    scales = torch.logspace(-2, 1, BATCH)
    return [
        torch.randn((BATCH, *p.shape), generator=gen) * scales.view(-1, *[1] * p.dim()) / 30
        for p in model.parameters()
    ]


def _pre_step(
    opt: DPOptimizer, model: nn.Module, samples: list[torch.Tensor]
) -> list[torch.Tensor]:
    opt.zero_grad(set_to_none=True)
    for p, g in zip(model.parameters(), samples, strict=True):
        p.grad_sample = g.clone()
    assert opt.pre_step()
    return [p.grad.clone() for p in model.parameters()]


def test_the_model_has_tensors_on_both_sides_of_the_threshold() -> None:
    sizes = [p.numel() for p in _model().parameters()]
    assert min(sizes) <= dp_optimizer.SMALL_TENSOR < max(sizes)


@pytest.mark.parametrize("clip", [0.05, 1.0, 100.0])
def test_clipped_sums_equal_opacus(clip: float) -> None:
    model = _model()
    opacus, batched = _optimizers(model, noise=0.0, clip=clip)
    assert type(batched) is BatchedDPOptimizer
    samples = _grad_samples(model, seed=1)
    expected = _pre_step(opacus, model, samples)
    got = _pre_step(batched, model, samples)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert any(float(e.abs().max()) > 0 for e in expected)


def test_per_sample_gradients_in_permuted_layouts_give_the_same_sums() -> None:
    """The slabs rule returns a permuted view; the optimizer reads it in memory order."""
    model = _model()
    opacus, batched = _optimizers(model, noise=0.0, clip=0.5)
    samples = _grad_samples(model, seed=4)
    expected = _pre_step(opacus, model, samples)
    # (N, O, C, k0, k1) stored as (k0, N, O, C, k1), as _weight_slabs does
    permuted = [
        g.permute(3, 0, 1, 2, 4).contiguous().permute(1, 2, 3, 0, 4) if g.dim() == 5 else g
        for g in samples
    ]
    assert any(not g.is_contiguous() for g in permuted)
    batched.zero_grad(set_to_none=True)
    for p, g in zip(model.parameters(), permuted, strict=True):
        p.grad_sample = g
    assert batched.pre_step()
    for e, p in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-7)


def test_noise_has_opacus_spread_on_every_coordinate_and_is_independent() -> None:
    model = _model()
    noise, clip = 1.5, 0.4
    _, batched = _optimizers(model, noise=noise, clip=clip)
    batched.generator = torch.Generator().manual_seed(7)
    zeros = [torch.zeros((BATCH, *p.shape)) for p in model.parameters()]
    first = torch.cat([g.flatten() for g in _pre_step(batched, model, zeros)]) * BATCH
    second = torch.cat([g.flatten() for g in _pre_step(batched, model, zeros)]) * BATCH
    assert first.numel() > 10_000
    for draw in (first, second):
        assert float(draw.std()) == pytest.approx(noise * clip, rel=0.03)
        assert abs(float(draw.mean())) < 0.03 * noise * clip
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.05
    small = next(p for p in model.parameters() if p.numel() <= dp_optimizer.SMALL_TENSOR)
    assert float(small.grad.abs().max()) > 0  # every tensor got noise, small ones included


def test_accumulated_grad_samples_use_opacus_own_steps() -> None:
    model = _model()
    opacus, batched = _optimizers(model, noise=0.0, clip=1.0)
    samples = _grad_samples(model, seed=2)
    halves = [[g[: BATCH // 2].clone(), g[BATCH // 2 :].clone()] for g in samples]

    def run(opt: DPOptimizer) -> list[torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        for p, parts in zip(model.parameters(), halves, strict=True):
            p.grad_sample = [t.clone() for t in parts]
        assert opt.pre_step()
        return [p.grad.clone() for p in model.parameters()]

    expected = run(opacus)
    for e, g in zip(expected, run(batched), strict=True):
        torch.testing.assert_close(g, e)
    assert batched._flat_summed is None  # Opacus's path ran


def test_a_second_step_without_zero_grad_is_refused_as_by_opacus() -> None:
    model = _model()
    _, batched = _optimizers(model, noise=0.0, clip=1.0)
    samples = _grad_samples(model, seed=3)
    _pre_step(batched, model, samples)
    with pytest.raises(ValueError, match="zero_grad"):
        batched.pre_step()


def test_make_private_trains_with_it_and_the_accountant_counts_each_step() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 5, 5, generator=gen), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=BATCH, generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=gen,
        loss_fn=loss_fn,
    )
    assert type(private.optimizer) is BatchedDPOptimizer
    before = [p.detach().clone() for p in model.parameters()]
    steps = 0
    for x, y in private.data_loader:
        if len(x):
            private.step(loss_fn, x, y)
            steps += 1
    private.close()
    assert steps > 0
    assert sum(s for _, _, s in private.engine.accountant.history) == steps
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_other_opacus_optimizers_are_left_alone() -> None:
    from opacus.optimizers import DPPerLayerOptimizer

    model = _model()
    per_layer = DPPerLayerOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=[1.0] * len(list(model.parameters())),
        expected_batch_size=BATCH,
    )
    assert type(batch_optimizer_steps(per_layer)) is DPPerLayerOptimizer
