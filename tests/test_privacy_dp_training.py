"""DP-SGD (Opacus) for every registered task; models are validated up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from medfed.core import privacy_accounting
from medfed.core.config import DataSourceConfig
from medfed.tasks import TASKS, dp, dp_modes, dp_samplers, dp_validation, engine


@pytest.mark.parametrize("name", TASKS.names())
def test_dp_training_of_each_registered_task(name: str) -> None:
    task = TASKS.get(name)
    model = task.build_model().eval()  # a cached model may come from evaluation
    dp_validation.validate_for_dp(model)  # raises on an incompatible model
    data = task.load_site_data(DataSourceConfig(num_samples=32, seed=3)).train
    data = Subset(data, range(min(6, len(data))))  # type: ignore[arg-type]
    batch = (len(data) + 1) // 2  # two Poisson steps
    before = engine.get_weights(model)
    stats = dp.dp_train(
        task,
        model,
        data,
        epochs=1,
        batch_size=batch,
        learning_rate=1e-2,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.steps == 2 and stats.history == privacy_accounting.plan_round(
        len(data), batch_size=batch, epochs=1, noise_multiplier=1.0
    )
    assert stats.sample_rate == pytest.approx(0.5)
    after = engine.get_weights(model)
    assert set(after) == set(before)  # the weights' layout is untouched
    assert any((after[k] != before[k]).any() for k in after)
    # the cached model leaves without Opacus hooks or per-sample gradients
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_a_batchnorm_model_is_rejected_with_the_fix_named() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    with pytest.raises(dp_validation.DPIncompatibleModel) as caught:
        dp_validation.validate_for_dp(model)
    text = str(caught.value)
    assert "1 (BatchNorm2d)" in text  # the offending module, by name
    assert "GroupNorm" in text and "ModuleValidator.fix" in text


def test_inplace_activations_are_noted_not_rejected() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(inplace=True))
    assert [n.split(":")[0] for n in dp_validation.validate_for_dp(model)] == ["2"]
    assert dp_validation.disable_inplace(model) == ["2"] and not model[2].inplace


@pytest.mark.parametrize("channels", [1, 3])
def test_prelu_per_sample_gradient_matches_functorch(channels: int) -> None:
    from opacus import GradSampleModule

    def grads(force_functorch: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 3, 3), nn.PReLU(channels), nn.Flatten(), nn.LazyLinear(1)
        )
        x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        model(x)
        gsm = GradSampleModule(model, force_functorch=force_functorch)
        gsm(x).sum().backward()
        return model[1].weight.grad_sample.clone()

    dp_samplers.register()
    fast = grads(False)
    assert fast.shape == (5, channels)
    torch.testing.assert_close(fast, grads(True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("dims", "stride", "padding", "output_padding", "dilation", "bias"),
    [
        (2, 2, 1, 1, 1, True),  # MONAI UNet's up-sampling layer
        (2, 1, 0, 0, 1, False),
        (2, 3, 2, 2, 2, True),
        (1, 2, 1, 1, 1, True),
        (3, 2, 1, 1, 1, True),
    ],
)
def test_conv_transpose_per_sample_gradient_matches_functorch(
    dims: int, stride: int, padding: int, output_padding: int, dilation: int, bias: bool
) -> None:
    from opacus import GradSampleModule

    conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]

    def grads(force_functorch: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(
            conv_t(
                3,
                4,
                3,
                stride=stride,
                padding=padding,
                output_padding=output_padding,
                dilation=dilation,
                bias=bias,
            ),
            nn.Flatten(),
            nn.LazyLinear(1),
        )
        x = torch.randn(5, 3, *([5] * dims), generator=torch.Generator().manual_seed(1))
        model(x)
        gsm = GradSampleModule(model, force_functorch=force_functorch)
        gsm(x).square().sum().backward()
        return [p.grad_sample.clone() for p in model[0].parameters()]

    dp_samplers.register()
    fast, reference = grads(False), grads(True)
    assert fast[0].shape == (5, 3, 4, *([3] * dims))
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sgd_with_averaged_iterates_sends_the_moving_average() -> None:
    task = TASKS.get("tiny-seg")
    data = task.load_site_data(DataSourceConfig(num_samples=32, seed=3)).train

    def train(average: float) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = task.build_model()
        before = engine.get_weights(model)
        dp.dp_train(
            task,
            model,
            data,
            epochs=1,
            batch_size=len(data),  # one step, rate 1
            learning_rate=0.1,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(0),
            optimizer="sgd",
            average_iterates=average,
        )
        return before, engine.get_weights(model)

    start, last = train(0.0)
    _, averaged = train(0.75)
    assert any(not np.allclose(last[k], start[k]) for k in last)
    for k in last:  # one step: EMA = 0.75 * start + 0.25 * last iterate, same noise draw
        np.testing.assert_allclose(
            averaged[k], 0.75 * start[k] + 0.25 * last[k], rtol=1e-5, atol=1e-6
        )


def test_fedprox_proximal_term_is_applied_under_dp_sgd_after_the_noise() -> None:
    # SGD, momentum 0.9, two full-batch steps on the same draws. The term's gradient at
    # step 1 is 0 (the weights are the anchor); at step 2 it is mu (w1 - w0), added to
    # the noised gradient, so the second step moves by lr * mu * (w1 - w0) more.
    task = TASKS.get("tiny-seg")
    data = task.load_site_data(DataSourceConfig(num_samples=16, seed=3)).train
    lr, mu = 0.05, 4.0

    def train(epochs: int, proximal_mu: float) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = task.build_model()
        before = engine.get_weights(model)
        dp.dp_train(
            task,
            model,
            data,
            epochs=epochs,
            batch_size=len(data),
            learning_rate=lr,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            device=torch.device("cpu"),
            generator=torch.Generator().manual_seed(0),
            optimizer="sgd",
            proximal_mu=proximal_mu,
        )
        return before, engine.get_weights(model)

    w0, w1 = train(1, 0.0)
    _, w2 = train(2, 0.0)
    _, w2_proximal = train(2, mu)
    assert any(not np.allclose(w1[k], w0[k]) for k in w1)
    for k in w2:
        np.testing.assert_allclose(
            w2_proximal[k], w2[k] - lr * mu * (w1[k] - w0[k]), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("name", ["tiny-seg", "brain-tissue-seg", "brain-lesion-cls"])
def test_vmap_per_sample_gradients_equal_opacus_hooks(name: str) -> None:
    import copy

    from opacus import GradSampleModule

    from medfed.tasks import dp_vmap

    task = TASKS.get(name)
    data = task.load_site_data(DataSourceConfig(num_samples=32, seed=3)).train
    x, y = dp_modes.first_samples(data, 3)
    torch.manual_seed(0)
    model = task.build_model().train()
    dp_validation.disable_inplace(model)
    dp_samplers.register()
    loss_fn = task.build_loss()
    assert dp_vmap.supported(model, loss_fn, x, y)
    assert dp_modes.choose_grad_sample_mode(model, loss_fn, (x, y)) in ("rules", "vmap")  # timed
    hooked = GradSampleModule(copy.deepcopy(model))  # Opacus's reference (loss mean)
    reference = loss_fn(hooked(x), y)
    reference.backward()
    loss = dp_vmap.per_sample_grads(model, loss_fn, x, y)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    pairs = zip(model.named_parameters(), hooked._module.named_parameters(), strict=True)
    for (name_a, a), (_, b) in pairs:
        assert a.grad_sample.shape == (3, *a.shape), name_a
        torch.testing.assert_close(a.grad_sample, b.grad_sample, rtol=1e-4, atol=1e-5)


def test_without_a_sample_opacus_picks_hooks_or_functorch() -> None:
    assert dp_modes.choose_grad_sample_mode(TASKS.get("tiny-seg").build_model()) == "hooks"
    assert (
        dp_modes.choose_grad_sample_mode(TASKS.get("brain-lesion-cls").build_model()) == "functorch"
    )
