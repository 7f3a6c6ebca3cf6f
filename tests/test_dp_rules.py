"""Per-sample gradients from layer rules (medfed.tasks.dp_rules) equal vmap's and Opacus's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from medfed.core.config import DataSourceConfig
from medfed.tasks import TASKS, dp_modes, dp_rules, dp_samplers, dp_validation, dp_vmap


def _batch(name: str, n: int = 3) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    task = TASKS.get(name)
    data = task.load_site_data(DataSourceConfig(num_samples=32, seed=3)).train
    x, y = dp_modes.first_samples(data, n)
    torch.manual_seed(0)
    model = task.build_model().train()
    dp_validation.disable_inplace(model)
    return model, task.build_loss(), x, y


#: Tasks padded to a real model size for transport benchmarks: no layer rule covers
#: their padding, so DP-SGD takes vmap's per-sample gradients for them
#: (tests/test_privacy_dp_training.py trains each registered task with DP).
PADDED = {"tiny-seg-1m", "tiny-seg-10m", "tiny-seg-50m"}


def test_only_the_padded_benchmark_tasks_lack_layer_rules() -> None:
    lacking = {n for n in TASKS.names() if dp_rules.unsupported(TASKS.get(n).build_model())}
    assert lacking == PADDED


@pytest.mark.parametrize("name", sorted(set(TASKS.names()) - PADDED))
def test_rules_per_sample_gradients_equal_vmap_and_opacus_hooks(name: str) -> None:
    from opacus import GradSampleModule

    model, loss_fn, x, y = _batch(name)
    assert dp_rules.unsupported(model) == []
    dp_samplers.register()
    hooked = GradSampleModule(copy.deepcopy(model))  # Opacus's reference (loss mean)
    loss_fn(hooked(x), y).backward()
    dp_vmap.per_sample_grads(model, loss_fn, x, y)
    vmapped = {k: p.grad_sample for k, p in model.named_parameters()}
    loss = dp_rules.per_sample_grads(model, loss_fn, x, y)
    torch.testing.assert_close(loss, loss_fn(model(x), y).detach(), rtol=1e-5, atol=1e-6)
    pairs = zip(model.named_parameters(), hooked._module.named_parameters(), strict=True)
    for (key, a), (_, b) in pairs:
        assert a.grad is None, key  # no batch gradient was computed along the way
        assert a.grad_sample.shape == (3, *a.shape), key
        torch.testing.assert_close(a.grad_sample, vmapped[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.grad_sample, b.grad_sample, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again
    assert not any(m._forward_hooks for m in model.modules())


_LAYERS = {
    "conv1d": lambda: nn.Conv1d(3, 4, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(3, 4, 3, padding=1),
    "conv2d-1x1-nobias": lambda: nn.Conv2d(3, 4, 1, bias=False),
    "conv2d-stride2": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),  # UNet's down path
    "conv2d-dilated": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv3d": lambda: nn.Conv3d(3, 4, 3, padding=1, bias=False),  # the DenseNet's 3x3x3
    "conv3d-stem": lambda: nn.Conv3d(2, 4, 7, stride=2, padding=3, bias=False),
    "conv3d-uneven-padding": lambda: nn.Conv3d(2, 3, 3, padding=(1, 0, 2)),
    "conv2d-dilated-stride1": lambda: nn.Conv2d(3, 4, 3, padding=3, dilation=2),
    "conv-t2d": lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
    "conv-t3d": lambda: nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1),
    "conv-t1d-groups": lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", sorted(_LAYERS))
def test_every_conv_weight_method_equals_autograd_per_sample(kind: str, threads: int) -> None:
    # one thread: how a site configured with compute.threads = 1 runs (torch's 3D
    # kernel is wrong there on an input no larger than the kernel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_conv_methods(kind)
    finally:
        torch.set_num_threads(before)


def _check_conv_methods(kind: str) -> None:
    torch.manual_seed(0)
    conv = _LAYERS[kind]()
    gen = torch.Generator().manual_seed(0)
    # 9 > the stem's kernel of 7: with an input no larger than the kernel, torch 2.13's
    # own CPU conv3d weight gradient (autograd's too) is wrong on one thread
    x = torch.randn(4, conv.in_channels, *([9] * (conv.weight.dim() - 2)), generator=gen)
    g = torch.randn(conv(x).shape, generator=gen)
    # autograd, one sample at a time, in float64: the exact per-sample gradient, so the
    # check does not hang on float32 summation order (it differs across CPUs' kernels)
    exact = copy.deepcopy(conv).double()
    expected = []
    for i in range(len(x)):
        exact.zero_grad()
        (exact(x[i : i + 1].double()) * g[i : i + 1].double()).sum().backward()
        expected.append([p.grad.clone() for p in exact.parameters()])
    methods = dp_rules._candidates(conv, tuple(x.shape[2:]))
    assert "loop" in methods
    assert ("grouped" in methods) == (not isinstance(conv, nn.ConvTranspose3d))
    stride_one = (
        not isinstance(conv, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
        and conv.groups == 1
        and all(s == 1 for s in conv.stride)
    )
    assert ("shifted" in methods) == stride_one
    for method in methods:
        got = dp_rules._METHODS[method](conv, x, g)
        _assert_float32_close(got, torch.stack([e[0] for e in expected]), method)
    grads = dp_rules.conv_grad_sample(conv, [x], g)  # the timed choice, and the bias
    for p, e in zip(conv.parameters(), zip(*expected, strict=True), strict=True):
        _assert_float32_close(grads[p], torch.stack(e), "chosen")


def _assert_float32_close(got: torch.Tensor, exact: torch.Tensor, method: str) -> None:
    # float32 sums of a few hundred products: within a few 1e-7 of the largest value
    # (seen up to 7e-7); a wrong method is off by the values themselves
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got.double(),
        exact,
        rtol=0,
        atol=2e-6 * float(exact.abs().max()),
        msg=lambda m: f"{method}: {m}",
    )


def test_grouped_3d_is_not_offered_on_an_input_no_larger_than_the_kernel() -> None:
    # torch's CPU conv3d weight gradient corrupts the heap or errs there; 2D is unaffected
    stem = nn.Conv3d(2, 4, 7, stride=2, padding=3)
    assert "grouped" in dp_rules._candidates(stem, (8, 9, 8))
    assert "grouped" not in dp_rules._candidates(stem, (8, 7, 8))
    dilated = nn.Conv3d(2, 4, 3, dilation=2, padding=2)  # reaches 5 voxels
    assert "grouped" not in dp_rules._candidates(dilated, (9, 5, 9))
    assert "grouped" in dp_rules._candidates(nn.Conv2d(2, 4, 7, padding=3), (5, 5))


def _conv2d_case() -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    """A 3x3 convolution, an input batch and an output gradient (seeded)."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    return conv, x, torch.randn(4, 4, 8, 8, generator=gen)


def test_a_method_that_disagrees_with_the_layers_own_kernel_is_never_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conv, x, g = _conv2d_case()
    wrong = lambda layer, x, g: torch.zeros(len(x), *layer.weight.shape)  # noqa: E731  # fast
    monkeypatch.setattr(
        dp_rules,
        "_METHODS",
        {**dp_rules._METHODS, "gemm": wrong, "slabs": wrong, "grouped": wrong, "shifted": wrong},
    )
    monkeypatch.setattr(dp_rules, "_METHOD", {})
    assert dp_rules._conv_method(conv, x, g) == "loop"


def test_a_method_far_slower_on_its_first_call_is_not_timed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conv, x, g = _conv2d_case()
    cost = {"loop": 1.0, "grouped": 0.2, "gemm": 0.3, "slabs": 0.65, "shifted": 0.25}
    calls: list[str] = []

    def counted(name: str) -> dp_rules.Method:
        real = dp_rules._METHODS[name]
        return lambda *a: (calls.append(name), real(*a))[1]

    def timed(fn: object, device: torch.device) -> tuple[torch.Tensor, float]:
        out = fn()  # type: ignore[operator]
        return out, cost[calls[-1]]

    monkeypatch.setattr(dp_rules, "_METHODS", {m: counted(m) for m in dp_rules._METHODS})
    monkeypatch.setattr(dp_rules, "_timed", timed)
    monkeypatch.setattr(dp_rules, "_METHOD", {})
    assert dp_rules._conv_method(conv, x, g) == "grouped"
    # loop (5x the fastest) and slabs (3.25x) ran once, to be checked; the rest 1 + 3 times
    assert {m: calls.count(m) for m in cost} == {
        "loop": 1,
        "grouped": 4,
        "gemm": 4,
        "slabs": 1,
        "shifted": 4,
    }


def test_group_norm_rule_equals_opacus() -> None:
    from opacus.grad_sample.group_norm import compute_group_norm_grad_sample

    from medfed.tasks import dp_samplers

    norm = nn.GroupNorm(2, 4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(generator=gen)
    x = torch.randn(3, 4, 5, 6, generator=gen)
    g = torch.randn(3, 4, 5, 6, generator=gen)
    ours = dp_samplers.group_norm_grad_sample(norm, [x], g)
    theirs = compute_group_norm_grad_sample(norm, [x], g)
    assert set(ours) == set(theirs) == {norm.weight, norm.bias}
    for p in ours:
        torch.testing.assert_close(ours[p], theirs[p], rtol=1e-5, atol=1e-5)


def test_a_layer_called_twice_gets_both_gradients() -> None:
    torch.manual_seed(0)
    shared = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Flatten(), nn.Linear(2 * 5 * 5, 1))
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randn(3, 1, generator=torch.Generator().manual_seed(2))
    loss_fn = nn.MSELoss()
    dp_vmap.per_sample_grads(model, loss_fn, x, y)
    reference = [p.grad_sample for p in model.parameters()]
    dp_rules.per_sample_grads(model, loss_fn, x, y)
    for p, r in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad_sample, r, rtol=1e-4, atol=1e-6)


def test_a_layer_without_a_rule_is_named_and_vmap_is_used() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Scale(), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(4, 1, generator=torch.Generator().manual_seed(1))
    model(x)
    assert dp_rules.unsupported(model) == ["1 (Scale)"]
    assert dp_modes.choose_grad_sample_mode(model, nn.MSELoss(), (x, y)) == "vmap"


def test_a_loss_that_couples_the_batch_is_refused_when_vmap_cannot_check_it() -> None:
    from monai.losses import DiceCELoss  # one_hot scatters in place: vmap cannot trace it

    model, _, x, y = _batch("tiny-seg", 4)
    per_sample = DiceCELoss(to_onehot_y=True, softmax=True)  # batch=False: a mean of samples
    assert dp_modes.choose_grad_sample_mode(model, per_sample, (x, y)) == "rules"
    with pytest.raises(dp_modes.LossNotPerSample, match="not the mean of each sample"):
        dp_modes.choose_grad_sample_mode(
            model, DiceCELoss(to_onehot_y=True, softmax=True, batch=True), (x, y)
        )


def test_rules_agreement_allows_float32_error_but_not_another_samples_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(4, 8, 3, 3, generator=gen)
    rounding = 1 + 1e-3 * torch.randn(reference.shape, generator=gen)  # float32 sums' error
    assert dp_modes._same_per_sample(reference * rounding, reference)
    swapped = reference[[1, 0, 2, 3]]
    assert not dp_modes._same_per_sample(swapped, reference)
    one_off = reference.clone()
    one_off[3] *= 1.05  # one sample's gradient 5% off
    assert not dp_modes._same_per_sample(one_off, reference)


def test_a_loss_coupling_the_batch_slightly_gets_vmap_not_the_rules() -> None:
    # vmap scores each sample alone; the rules differentiate the batch loss, so a
    # coupling too weak for the gradients' float32 tolerance must still be caught
    class WeaklyCoupled(nn.Module):
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return nn.functional.mse_loss(out, y) + 1e-2 * out.mean() ** 2

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(32, 1))
    x = torch.randn(4, 1, 6, 6, generator=gen)
    y = torch.randn(4, 1, generator=gen)
    loss = WeaklyCoupled()
    assert dp_modes._rules_agree(model, loss, x, y, against_vmap=True)  # within tolerance
    assert dp_modes.choose_grad_sample_mode(model, loss, (x, y)) == "vmap"
    # the same model with a per-sample loss: the rules qualify (which one runs is timed)
    assert dp_modes._loss_is_mean_of_samples(model, nn.MSELoss(), x, y)
    assert not dp_modes._loss_is_mean_of_samples(model, loss, x, y)


def test_the_3d_segresnet_gets_the_rules() -> None:
    # its rules' and vmap's float32 gradients differ by up to 3e-3 (each ~1e-3 from
    # float64): an elementwise 1e-3 check had refused the faster rules
    model, loss_fn, x, y = _batch("brain-tissue-seg-3d", 4)
    assert dp_modes._loss_is_mean_of_samples(model, loss_fn, x, y)
    assert dp_modes._rules_agree(model, loss_fn, x, y, against_vmap=True)


def test_vmap_is_chosen_only_when_clearly_faster_than_the_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cost = {"rules": 1.0, "vmap": 0.95}  # seconds per call, as the timer would read them
    order: list[str] = []
    monkeypatch.setattr(dp_modes, "PER_SAMPLE_GRADS", {m: (lambda *_, m=m: m) for m in cost})
    monkeypatch.setattr(
        dp_rules, "wall_time", lambda call, device: (order.append(call()), cost[order[-1]])[1]
    )
    x = torch.zeros(2, 1)
    assert dp_modes._faster_mode(["rules", "vmap"], nn.Identity(), nn.MSELoss(), x, x) == "rules"
    assert order == ["rules", "vmap"] * dp_modes._TIMED_CALLS  # interleaved
    cost["vmap"] = 0.8
    assert dp_modes._faster_mode(["rules", "vmap"], nn.Identity(), nn.MSELoss(), x, x) == "vmap"
