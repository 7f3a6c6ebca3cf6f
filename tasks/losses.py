"""Losses shared by tasks."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


class DiceCEOnLabels(nn.Module):
    """MONAI's ``DiceCELoss`` (softmax) on class-index targets ``(N, 1, *spatial)``.

    The same value as ``DiceCELoss(to_onehot_y=True, softmax=True)``, but the target
    is one-hot encoded out of place: MONAI's ``one_hot`` scatters in place, which
    ``torch.func.vmap`` cannot trace, and vmap is medfed's fastest DP-SGD path
    (:mod:`medfed.tasks.dp_vmap`). ``batch=False`` keeps the loss a sum of per-sample
    terms, which DP-SGD requires.
    """

    def __init__(self, num_classes: int, *, batch: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loss = DiceCELoss(to_onehot_y=False, softmax=True, batch=batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits (N, C, ...)`` against class indices ``target (N, 1, ...)``."""
        classes = torch.arange(self.num_classes, device=target.device)
        shape = (1, self.num_classes) + (1,) * (target.dim() - 2)
        one_hot = (target.long() == classes.view(shape)).to(logits.dtype)
        return self.loss(logits, one_hot)
