"""Per-sample gradients of a whole model in one ``torch.func.vmap(grad(...))`` call.

Opacus's hooks mode computes per-sample gradients layer by layer from Python
hooks (unfold + einsum per convolution); functorch mode re-runs each layer under
vmap. Vectorizing the whole model's forward and backward at once avoids both the
per-layer Python work and the unfold copies: measured DP/plain step time on CPU,
batch 16, brain-tissue-seg 1.84x (hooks) vs about 1.6x, brain-lesion-cls 3.7x
(functorch) vs about 2.6x. Opacus still does everything that is privacy: its
``grad_sample_mode="no_op"`` takes the gradients from here, then clips, noises
and accounts as usual.

It needs a model and loss that vmap can trace (no in-place ops on unbatched
tensors, no BatchNorm statistics). :func:`supported` probes that on two samples;
when it fails, :mod:`medfed.tasks.dp` uses Opacus's hooks instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap


def _per_sample(
    module: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in module.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad_and_value(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def per_sample_grads(
    module: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Set ``p.grad_sample`` (each sample's own loss gradient) on every trainable parameter.

    Returns the batch's mean loss (detached), as ``loss_fn`` on the batch would.
    """
    grads, losses = _per_sample(module, loss_fn, x, y)
    for name, p in module.named_parameters():
        if p.requires_grad:
            p.grad_sample = grads[name]
    return losses.mean()


def supported(module: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether vmap can trace ``module`` and ``loss_fn`` on these samples (nothing is set)."""
    try:
        _per_sample(module, loss_fn, x[:2], y[:2])
    except Exception:  # any trace failure means: use Opacus's hooks instead
        return False
    return True
