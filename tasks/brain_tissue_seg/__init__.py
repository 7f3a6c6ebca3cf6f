"""brain-tissue-seg: CSF / grey matter / white matter on 2D axial slices, MONAI UNet.

Why 2D slices and not 3D volumes
--------------------------------
Speed: a site holds a handful to a few dozen scans. Cut into axial slices they
give 40-50 training samples per scan, and a 2D UNet at 64x64 trains an epoch
of a site in seconds on one CPU core; a 3D UNet on the same voxels costs
several times more per sample, needs more memory per batch (bad for DP-SGD's
per-sample gradients) and sees only a few samples per epoch. Quality: tissue
classes are set mostly by in-plane intensity and local context, which a 2D
network captures; what it loses is through-plane context, and through-plane
resolution is the poorest axis here (3-4 mm slices, thicker at some sites),
so little is lost. A 3D or 2.5D model is the upgrade path once sites have GPUs.

Preprocessing (:func:`medfed.tasks.imaging.preprocess`): reorient to axial LPS,
resample in plane to 3 mm (the series' own slice spacing kept), scale each
volume's 1st..99th intensity percentiles to 0..1, pad/crop to 64x64 (192 mm,
the whole head); all slices with brain are kept, one in four without.

Labels: 0 background, 1 CSF, 2 GM, 3 WM (as written by ``medfed data synth``);
4 output channels. Metrics: Dice per tissue over all validation voxels pooled
(``dice-csf``, ``dice-gm``, ``dice-wm``) and their mean, ``dice``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.tasks.base import Hyperparameters, SiteData, Task
from medfed.tasks.harmonization import mean_landmarks
from medfed.tasks.imaging import (
    Subject,
    axial_slices,
    load_subjects,
    preprocess,
    public_atlas_subjects,
    split_subjects,
    unit_indices,
)
from medfed.tasks.losses import DiceCEOnLabels

NAME = "brain-tissue-seg"
#: Tissue classes after background, in label-value order.
CLASSES: tuple[str, ...] = ("csf", "gm", "wm")
#: In-plane size (pixels) and spacing (mm) every slice is brought to.
SIZE = 64
PIXDIM_MM = 3.0


def build_model(width: int = 16) -> nn.Module:
    """A 4-level MONAI UNet with instance norm (no BatchNorm: DP-ready).

    ``width`` 16 (the task): 0.21 M parameters; 32 (``brain-tissue-seg-wide``): 0.82 M.
    """
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1 + len(CLASSES),
        channels=tuple(width * 2**level for level in range(4)),
        strides=(2, 2, 2),
        num_res_units=1,
        norm="instance",
    )


def build_loss() -> nn.Module:
    """Dice + cross-entropy (MONAI), per slice.

    The loss must be a sum of per-sample terms: Opacus's per-sample gradients (DP-SGD)
    are only private if no sample's loss depends on another's, which rules out
    ``batch=True`` Dice. MONAI's smoothing terms keep a slice without CSF finite.
    """
    return DiceCEOnLabels(1 + len(CLASSES), batch=False)


def compute_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Dice per tissue over all voxels of the split pooled, and their mean (MONAI DiceMetric).

    The ``(N, C, H, W)`` slices are scored as one ``(1, C, N, H, W)`` volume,
    so a tissue missing from some slices does not make those slices' Dice undefined.
    """
    n_classes = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), num_classes=n_classes)
    true = one_hot(target.long(), num_classes=n_classes)
    as_volume = lambda t: t.movedim(0, 1).unsqueeze(0)  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = metric(as_volume(pred), as_volume(true))[0]
    per_class = {f"dice-{name}": float(d) for name, d in zip(CLASSES, dice, strict=True)}
    return {**per_class, "dice": float(dice.mean())}


def _slices(
    subjects: list[Subject], bias_correction: str = "off"
) -> tuple[TensorDataset, dict[str, torch.Tensor]]:
    """The subjects' slices, and the scan and patient of each (``SiteData.train_units``)."""
    images, labels = [], []
    for subject in subjects:
        image, label = preprocess(
            subject,
            pixdim=(PIXDIM_MM, PIXDIM_MM, -1),
            spatial_size=(SIZE, SIZE, -1),
            bias_correction=bias_correction,
        )
        assert label is not None  # only labelled subjects come here
        x, y = axial_slices(image, label)
        images.append(x)
        labels.append(y)
    units = unit_indices(subjects, [len(x) for x in images])
    return TensorDataset(torch.cat(images), torch.cat(labels)), units


@dataclasses.dataclass(frozen=True)
class LabelledSplit:
    """A site's scans with a tissue label, split by subject (patients never straddle)."""

    train: list[Subject]
    val: list[Subject]
    unlabelled: int  # series without a label (counted, not used)

    def description(self, train: int, val: int) -> dict[str, int]:
        """SiteData's counts: ``train``/``val`` examples (slices, patches, scans)."""
        return {
            "train": train,
            "val": val,
            "subjects-train": len(self.train),
            "subjects-val": len(self.val),
            "unlabelled": self.unlabelled,
        }


def labelled_split(source: DataSourceConfig, task: str) -> LabelledSplit:
    """The site's labelled subjects split for ``task``; fewer than 2 is a clear error."""
    subjects = load_subjects(source)
    labelled = [s for s in subjects if s.label is not None]
    if len(labelled) < 2:
        raise MedfedError(
            f"{task} needs at least 2 series with a tissue label, found {len(labelled)} "
            f"of {len(subjects)}",
            where=source.path or "[data] in site.toml",
            expected="label volumes 0 background, 1 CSF, 2 GM, 3 WM per series",
            fix="name a NIfTI label per series in the folder's manifest.json "
            "(see medfed.data.labels), or add DICOM SEGs",
        )
    train_keys, val_keys = split_subjects(
        [s.key for s in labelled],
        seed=source.seed,
        val_fraction=source.val_fraction,
        patients=[s.patient for s in labelled],
    )
    by_key = {s.key: s for s in labelled}
    return LabelledSplit(
        [by_key[k] for k in train_keys],
        [by_key[k] for k in val_keys],
        len(subjects) - len(labelled),
    )


def load_site_data(source: DataSourceConfig) -> SiteData:
    """The site's labelled scans, split by subject, as 64x64 axial slices."""
    split = labelled_split(source, NAME)
    train, train_units = _slices(split.train, source.bias_correction)
    val, val_units = _slices(split.val, source.bias_correction)
    return SiteData(
        train=train,
        val=val,
        train_units=train_units,
        val_units={"scan": val_units["scan"]},
        description=split.description(len(train), len(val)),
    )


def public_data(subjects: int, seed: int) -> TensorDataset:
    """Public pretraining slices: Colin27 (mricron-data), another brain than the sites' MNI152.

    Labels from a Gaussian mixture on its own T1, random warps and scanners; no site's data.
    """
    return _slices(public_atlas_subjects(subjects, seed=seed))[0]


def public_standard(subjects: int, seed: int) -> tuple[Any, int]:
    """The mean intensity landmarks of :func:`public_data`'s scans (histogram-public)."""
    data, units = _slices(public_atlas_subjects(subjects, seed=seed))
    return mean_landmarks(data, units["scan"])


#: Pretrained on :func:`public_data` by ``medfed pretrain --task brain-tissue-seg``
#: (recipe in the .json beside it).
PUBLIC_WEIGHTS = Path(__file__).with_name("public_weights.npz")

TASK = Task(
    name=NAME,
    description="brain MRI tissue segmentation (CSF/GM/WM), 2D MONAI UNet on 64x64 axial slices",
    build_model=build_model,
    build_loss=build_loss,
    compute_metrics=compute_metrics,
    primary_metric="dice",
    load_site_data=load_site_data,
    defaults=Hyperparameters(learning_rate=3e-3, batch_size=16, local_epochs=1),
    # Encoder levels 1-2 and decoder levels 2-1 (11% of the parameters): where a
    # scanner's contrast and resolution show; the deeper levels are anatomy, shared.
    input_block=("model.0", "model.1.submodule.0"),
    output_block=("model.1.submodule.2", "model.2"),
    public_data=public_data,
    public_weights=PUBLIC_WEIGHTS,
    public_standard=public_standard,
)

#: The same task with a UNet twice as wide (0.82 M parameters): for sites with a GPU,
#: and the ~1 M-parameter model of the secure-aggregation deployment benchmark.
TASK_WIDE = dataclasses.replace(
    TASK,
    name=f"{NAME}-wide",
    description="brain-tissue-seg with a 2x wider UNet (0.82 M parameters), for GPU sites",
    build_model=functools.partial(build_model, width=32),
    public_weights=None,  # `medfed pretrain --task brain-tissue-seg-wide` makes them
)
