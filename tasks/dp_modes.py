"""Which per-sample gradient mode DP-SGD runs for a model and loss, measured once per task.

``"rules"`` (:mod:`medfed.tasks.dp_rules`) and ``"vmap"`` (:mod:`medfed.tasks.dp_vmap`)
bypass Opacus's hooks; Opacus's own ``"hooks"`` and ``"functorch"`` are the fallbacks.
What each costs, and why the others are not used: docs/dp-per-sample-gradients.md.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medfed.core.errors import MedfedError
from medfed.tasks import dp_rules, dp_vmap

#: Per-sample gradient modes medfed runs: ``"rules"`` and ``"vmap"``, both with Opacus in
#: ``no_op`` mode, and two of Opacus's own (``"ew"`` and ``"ghost"`` fail or lose here).
GRAD_SAMPLE_MODES = ("rules", "vmap", "hooks", "functorch")
#: Per-sample gradient functions of the modes that bypass Opacus's hooks.
PER_SAMPLE_GRADS = {"rules": dp_rules.per_sample_grads, "vmap": dp_vmap.per_sample_grads}


class LossNotPerSample(MedfedError):
    """The task's loss couples the samples of a batch: DP-SGD's clipping would not bound them."""


def _loss_is_mean_of_samples(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> bool:
    """Whether the batch loss equals the mean of each sample's own loss (model in eval mode)."""
    was_training = model.training
    model.eval()  # no dropout draws: the same function of each sample both times
    try:
        with torch.no_grad():
            batch = loss_fn(model(x), y)
            alone = torch.stack([loss_fn(model(x[i : i + 1]), y[i : i + 1]) for i in range(len(x))])
    finally:
        model.train(was_training)
    return bool(torch.allclose(batch, alone.mean(), rtol=1e-4, atol=1e-6))


#: Interleaved timed calls per mode, and how much faster vmap must be to be chosen.
#: From two calls each, brain-tissue-seg-wide got vmap in some processes although it is
#: the slower mode there (DP/plain 1.51 against 1.32-1.34 with the rules).
_TIMED_CALLS = 5
_VMAP_MARGIN = 0.10


def _faster_mode(
    modes: list[str], model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> str:
    """``"rules"`` unless vmap's median time beats it by :data:`_VMAP_MARGIN`.

    Calls alternate between the modes, so a slow spell of a shared machine (another
    site, the OS) lands on both; the margin keeps timing noise from flipping it.
    """
    calls = {m: functools.partial(PER_SAMPLE_GRADS[m], model, loss_fn, x, y) for m in modes}
    for call in calls.values():
        call()  # warm-up: kernels prepared, caches filled
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(_TIMED_CALLS):
        for m, call in calls.items():
            times[m].append(dp_rules.wall_time(call, x.device))
    median = {m: float(np.median(t)) for m, t in times.items()}
    if median["vmap"] < (1.0 - _VMAP_MARGIN) * median["rules"]:
        return "vmap"
    return "rules"


#: Largest relative L2 distance between the rules' and vmap's gradient of one sample, per
#: parameter. Both are float32 sums over whole feature maps: on the 3D SegResNet each is
#: within 1.2e-3 of a float64 reference and they differ by up to 3e-3 (elementwise, at
#: 1e-3, they were refused there and vmap ran, 20% slower); another sample's gradient is
#: off by 0.34. The loss's split into per-sample terms is checked apart, tightly.
_AGREEMENT = 1e-2


def _same_per_sample(got: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether every sample's gradient is within :data:`_AGREEMENT` of the reference's."""
    a = got.reshape(len(got), -1).double()
    b = reference.reshape(len(reference), -1).double()
    scale = b.norm(dim=1).clamp_min(1e-12)
    return bool(((a - b).norm(dim=1) <= _AGREEMENT * scale).all())


def _rules_agree(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, against_vmap: bool
) -> bool:
    """Whether the layer rules run on this batch and, if asked, give vmap's gradients."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        if against_vmap:
            dp_vmap.per_sample_grads(model, loss_fn, x, y)
            reference = [p.grad_sample for p in trainable]
        dp_rules.per_sample_grads(model, loss_fn, x, y)
        return not against_vmap or all(
            _same_per_sample(p.grad_sample, r) for p, r in zip(trainable, reference, strict=True)
        )
    except Exception:  # a layer the rules cannot follow (e.g. tuple outputs): not this mode
        return False
    finally:
        for p in model.parameters():
            p.grad_sample = None


def _opacus_mode(model: nn.Module) -> str:
    """Opacus's own mode: functorch for 3D convolutions (unfold3d copies inputs k^3 times)."""
    return "functorch" if any(isinstance(m, nn.Conv3d) for m in model.modules()) else "hooks"


def choose_grad_sample_mode(
    model: nn.Module,
    loss_fn: nn.Module | None = None,
    sample: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> str:
    """The fastest correct per-sample gradient mode for ``model`` and ``loss_fn``, measured.

    With ``loss_fn`` and ``sample`` (a batch of the expected size): ``"vmap"`` when
    ``torch.func`` can trace model and loss, ``"rules"`` when every layer with
    parameters has a rule and its gradients equal vmap's on ``sample`` (or, where vmap
    cannot trace, the batch loss is the mean of the samples' own losses, which the
    rules assume); when both qualify, the rules unless vmap is clearly faster on
    ``sample`` (:func:`_faster_mode`: medians of five interleaved calls, 10% margin).
    A loss that couples the samples of a batch is refused (:class:`LossNotPerSample`):
    per-sample clipping would not bound any sample's influence. Without a sample:
    ``"functorch"`` for 3D convolutions (Opacus's unfold3d copies each input k^3 times)
    and ``"hooks"`` otherwise, Opacus's own.
    """
    if loss_fn is None or sample is None:
        return _opacus_mode(model)
    x, y = sample
    vmap_ok = dp_vmap.supported(model, loss_fn, x, y)
    if not vmap_ok and not _loss_is_mean_of_samples(model, loss_fn, x, y):
        raise LossNotPerSample(
            "The task's loss is not the mean of each sample's own loss: a sample's "
            "gradient depends on the other samples of the batch, so DP-SGD's per-sample "
            "clipping would not bound its influence.",
            where=f"the task's build_loss ({type(loss_fn).__name__})",
            expected="a loss averaged over per-sample terms (e.g. MONAI Dice with batch=False)",
            fix="compute the loss per sample and average it (no batch-wide Dice or statistics)",
        )
    # the rules assume the batch loss is the mean of the samples' own: checked tightly here
    # (vmap's gradients agree only to float32 precision, see _AGREEMENT)
    rules_ok = (
        not dp_rules.unsupported(model)
        and (not vmap_ok or _loss_is_mean_of_samples(model, loss_fn, x, y))
        and _rules_agree(model, loss_fn, x, y, vmap_ok)
    )
    candidates = [m for m, ok in (("rules", rules_ok), ("vmap", vmap_ok)) if ok]
    if not candidates:
        return _opacus_mode(model)
    if len(candidates) == 1:
        return candidates[0]
    chosen = _faster_mode(candidates, model, loss_fn, x, y)
    for p in model.parameters():
        p.grad_sample = None
    return chosen


def first_samples(dataset: Dataset[Any], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``dataset`` as a batch (the vmap probe's input)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
