"""tiny-seg: 2-class 2D segmentation of bright blobs with a small MONAI UNet.

A fast smoke-test task: 32x32 images, a ~7k-parameter UNet, seconds per round
on a CPU. Each site's synthetic ``profile`` shifts contrast and noise so that
sites differ. The medical tasks (brain MRI) replace it in the demo once they land.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.tasks.base import Hyperparameters, SiteData, Task
from medfed.tasks.losses import DiceCEOnLabels

SIZE = 32


def build_model() -> nn.Module:
    """A 2-level MONAI UNet with instance norm (no BatchNorm: DP-compatible)."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(8, 16),
        strides=(2,),
        num_res_units=1,
        norm="instance",
    )


def build_loss() -> nn.Module:
    """Dice + cross-entropy on one-hot targets (MONAI)."""
    return DiceCEOnLabels(2)


def compute_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Foreground Dice (MONAI DiceMetric)."""
    pred = logits.argmax(1, keepdim=True)
    metric = DiceMetric(include_background=False, reduction="mean")
    one_hot = lambda t: torch.cat([t == 0, t == 1], 1).float()  # noqa: E731
    dice = metric(one_hot(pred), one_hot(target.long()))
    return {"dice": float(torch.nan_to_num(dice, nan=1.0).mean())}


def synthesize(source: DataSourceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with 1-3 random discs; the site profile sets contrast, offset and noise."""
    g = torch.Generator().manual_seed(source.seed)
    n = source.num_samples
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    labels = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            cy, cx = torch.randint(6, SIZE - 6, (2,), generator=g)
            r = float(torch.randint(3, 7, (1,), generator=g))
            labels[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    contrast = 1.0 - 0.15 * (source.profile % 4)
    offset = 0.1 * (source.profile % 3)
    noise = 0.1 + 0.05 * (source.profile % 3)
    images = offset + contrast * labels + noise * torch.randn(labels.shape, generator=g)
    return images.float(), labels.long()


def load_site_data(source: DataSourceConfig) -> SiteData:
    """Split the synthetic set deterministically into train and validation."""
    if source.kind != "synthetic":
        raise ValueError(f"tiny-seg reads only kind = 'synthetic' data, got {source.kind!r}")
    x, y = synthesize(source)
    n_val = max(1, int(len(x) * source.val_fraction))
    return SiteData(
        train=TensorDataset(x[n_val:], y[n_val:]),
        val=TensorDataset(x[:n_val], y[:n_val]),
        # each synthetic image stands alone: its own scan and patient
        train_units={u: torch.arange(len(x) - n_val) for u in ("scan", "patient")},
        description={"train": len(x) - n_val, "val": n_val},
    )


TASK = Task(
    name="tiny-seg",
    description="2D blob segmentation, small MONAI UNet (smoke test; seconds per round)",
    build_model=build_model,
    build_loss=build_loss,
    compute_metrics=compute_metrics,
    primary_metric="dice",
    load_site_data=load_site_data,
    defaults=Hyperparameters(learning_rate=1e-2, batch_size=16, local_epochs=1),
    input_block=("model.0",),
    output_block=("model.2",),
)


#: Scale of the padding's values and of its term: the offset stays about 1e-3 * extra *
#: 5e-3 (0.05 at 10M), and each step moves every padding value by a distinct amount.
PADDING_SCALE = 1e-3
PADDING_WEIGHT = 5e-3


class PaddedUNet(UNet):
    """tiny-seg's UNet plus ``extra`` parameters: a learned offset of the class-0 logit.

    What the sites and the server move and add is a real-size model (10M, 50M values),
    while each step costs what tiny-seg's does plus one pass over the extra values:
    the workload of the transport and aggregation benchmarks at real model sizes
    (``benchmarks/round_latency.py --params``), equal to the stock Flower app's.

    The padding starts random and its gradient differs per value (the offset is a
    weighted sum of squares, added to one class only: an offset of every class would
    cancel in the softmax and leave it no gradient). A constant padding, or a constant
    update of it, would let Flower send each distinct 5 MB chunk once (objects are
    stored by content hash): transport figures of a model that does not exist.
    """

    def __init__(self, extra: int) -> None:
        super().__init__(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            channels=(8, 16),
            strides=(2,),
            num_res_units=1,
            norm="instance",
        )
        self.padding = nn.Parameter(torch.randn(extra) * PADDING_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's logits, class 0's offset by the padding's weighted sum of squares."""
        logits = super().forward(x)
        offset = PADDING_WEIGHT * self.padding.pow(2).sum()
        return torch.cat([logits[:, :1] + offset, logits[:, 1:]], dim=1)


def padded(parameters: int) -> Task:
    """tiny-seg with its model grown to ``parameters`` values (see :class:`PaddedUNet`)."""
    extra = parameters - sum(p.numel() for p in build_model().parameters())
    label = f"{parameters // 1_000_000}m"
    return dataclasses.replace(
        TASK,
        name=f"tiny-seg-{label}",
        description=f"tiny-seg with its model padded to {parameters // 1_000_000}M parameters "
        "(transport benchmarks at real model size; tiny-seg's compute)",
        build_model=functools.partial(PaddedUNet, extra),
    )


#: Real-size transfers at smoke-test compute: the benchmarks' 10M and 50M models.
TASK_1M = padded(1_000_000)
TASK_10M = padded(10_000_000)
TASK_50M = padded(50_000_000)
#: The padded models: real-size transfers, not real-size compute (see :class:`PaddedUNet`).
PADDED_TASKS = (TASK_1M, TASK_10M, TASK_50M)
