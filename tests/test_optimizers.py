"""The tasks' Adam is torch's fused kernel on CPU and the same algorithm as the default."""

from __future__ import annotations

import torch

from medfed.tasks.optimizers import adam


def _steps(opt_of: object, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(1000, generator=gen))
    opt = opt_of([p])  # type: ignore[operator]
    for _ in range(5):
        opt.zero_grad()
        (p.pow(2) * torch.linspace(0.1, 2.0, 1000)).sum().backward()
        opt.step()
    return p.detach()


def test_cpu_parameters_get_the_fused_kernel() -> None:
    opt = adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=1e-4)
    assert opt.defaults["fused"] is True
    assert opt.defaults["lr"] == 0.1 and opt.defaults["weight_decay"] == 1e-4


def test_fused_steps_match_torchs_default_adam() -> None:
    fused = _steps(lambda ps: adam(ps, lr=1e-2, weight_decay=1e-3))
    default = _steps(lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3))
    start = _steps(lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert not torch.equal(fused, start)  # it trained
    torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)


def test_parameters_on_a_device_without_the_kernel_keep_the_default_loop() -> None:
    meta = adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=0.1)
    assert not meta.defaults["fused"]
