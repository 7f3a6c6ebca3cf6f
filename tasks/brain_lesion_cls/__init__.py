"""brain-lesion-cls: white-matter lesion present or absent, per scan, small 3D MONAI DenseNet.

Why per scan (3D, downsampled) and not per slab of slices
---------------------------------------------------------
The target is per series (the manifest's ``targets[uid]["lesion"]``): nothing
says which slices hold the lesion. A synthetic lesion (sigma 4-7 mm) spans
about 5-8 of a scan's 40-50 axial slices, so slabs labelled with their
scan's flag would be mostly wrong positives; the network would learn noise.
A whole scan resampled to 4 mm isotropic and padded/cropped to 40x48x40
(160x192x160 mm, the whole head) keeps a lesion 2-4 voxels wide, and a 3D
DenseNet with few features costs a few tens of milliseconds per scan on a CPU
core, so an epoch of a site takes about a second. Few samples per site is the
price; the training split also holds each scan mirrored left-right (the brain
is nearly symmetric, a lesion may be on either side) to double it, deterministically.

Preprocessing (:func:`medfed.tasks.imaging.preprocess`): reorient to LPS,
resample to 4 mm, scale each volume's 1st..99th intensity percentiles to 0..1;
a second input channel holds the left-right asymmetry (:func:`with_asymmetry`).

Output: one logit (lesion); loss: binary cross-entropy on logits. Metrics:
``auc`` (MONAI ``compute_roc_auc``; 0.5 when the split holds only one class,
where AUC is undefined) and ``accuracy`` at probability 0.5.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_roc_auc
from monai.networks.nets import DenseNet
from torch import nn
from torch.utils.data import TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.tasks.base import Hyperparameters, SiteData, Task
from medfed.tasks.imaging import Subject, load_subjects, preprocess, split_subjects, unit_indices

NAME = "brain-lesion-cls"
TARGET = "lesion"
#: Isotropic voxel size (mm) and grid every scan is brought to.
PIXDIM_MM = 4.0
SHAPE = (40, 48, 40)


def build_model() -> nn.Module:
    """A 3-block 3D MONAI DenseNet (~53 k parameters), group norm (no BatchNorm), max-pooled head.

    Every normalised width (16 + 8k features, 16 after the bottleneck) is a
    multiple of 8, so 4 groups always divide it. The head pools the last
    feature map by its maximum, not its mean: "is there a lesion anywhere"
    is an existence question, and a mean dilutes a 3-voxel blob among ~100
    positions (with the mean, training did not leave chance level here).
    """
    model = DenseNet(
        spatial_dims=3,
        in_channels=2,
        out_channels=1,
        init_features=16,
        growth_rate=8,
        block_config=(2, 4, 4),
        bn_size=2,
        norm=("group", {"num_groups": 4}),
    )
    model.class_layers.pool = nn.AdaptiveMaxPool3d(1)
    return model


def build_loss() -> nn.Module:
    """Binary cross-entropy on the lesion logit."""
    return nn.BCEWithLogitsLoss()


def compute_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """ROC AUC (MONAI) and accuracy of lesion logits ``(N, 1)`` against 0/1 targets ``(N, 1)``."""
    score = torch.sigmoid(logits.float().reshape(-1))
    truth = target.float().reshape(-1)
    both_classes = bool((truth > 0.5).any() and (truth < 0.5).any())
    auc = float(compute_roc_auc(score, truth)) if both_classes else 0.5
    accuracy = float(((score >= 0.5).float() == truth).float().mean()) if len(truth) else 0.0
    return {"auc": auc, "accuracy": accuracy}


def with_asymmetry(image: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z)`` -> ``(2, X, Y, Z)``: the image and its left-right asymmetry.

    The second channel is the image minus its mirror image across the grid's
    sagittal midplane. Healthy anatomy is nearly symmetric, a lesion mostly is
    not, so it stands out there; the misalignment of head and grid (a few mm)
    leaves only thin edges.
    """
    return torch.cat([image, image - torch.flip(image, dims=(1,))])


def _scans(
    subjects: list[Subject], *, mirrored: bool, bias_correction: str = "off"
) -> TensorDataset:
    images, targets = [], []
    for subject in subjects:
        image, _ = preprocess(
            Subject(key=subject.key, image=subject.image, label=None),
            pixdim=(PIXDIM_MM,) * 3,
            spatial_size=SHAPE,
            bias_correction=bias_correction,
        )
        y = torch.tensor([subject.targets[TARGET]], dtype=torch.float32)
        images.append(with_asymmetry(image))
        targets.append(y)
        if mirrored:  # x is the patient's left-right axis
            images.append(with_asymmetry(torch.flip(image, dims=(1,))))
            targets.append(y)
    return TensorDataset(torch.stack(images), torch.stack(targets))


def load_site_data(source: DataSourceConfig) -> SiteData:
    """The site's scans with a lesion target, split by subject with both classes on each side."""
    subjects = load_subjects(source)
    usable = [s for s in subjects if TARGET in s.targets]
    if len(usable) < 2:
        raise MedfedError(
            f"{NAME} needs at least 2 series with a {TARGET!r} target, found {len(usable)} "
            f"of {len(subjects)}",
            where=source.path or "[data] in site.toml",
            expected='"targets": {"<SeriesInstanceUID>": {"lesion": 0 or 1}} in manifest.json',
            fix="add the targets to the folder's manifest.json (see medfed.data.targets)",
        )
    strata = [int(s.targets[TARGET] > 0.5) for s in usable]
    train_keys, val_keys = split_subjects(
        [s.key for s in usable],
        seed=source.seed,
        val_fraction=source.val_fraction,
        strata=strata,
        patients=[s.patient for s in usable],
    )
    by_key = {s.key: s for s in usable}
    train = _scans(
        [by_key[k] for k in train_keys], mirrored=True, bias_correction=source.bias_correction
    )
    val = _scans(
        [by_key[k] for k in val_keys], mirrored=False, bias_correction=source.bias_correction
    )
    return SiteData(
        train=train,
        val=val,
        # each training scan gives two examples: itself and its mirror image
        train_units=unit_indices([by_key[k] for k in train_keys], [2] * len(train_keys)),
        description={
            "train": len(train),
            "val": len(val),
            "subjects-train": len(train_keys),
            "subjects-val": len(val_keys),
            "lesion": sum(strata),
            "no-target": len(subjects) - len(usable),
        },
    )


TASK = Task(
    name=NAME,
    description="brain MRI lesion present/absent per scan, small 3D MONAI DenseNet at 4 mm",
    build_model=build_model,
    build_loss=build_loss,
    compute_metrics=compute_metrics,
    primary_metric="auc",
    load_site_data=load_site_data,
    defaults=Hyperparameters(learning_rate=1e-3, batch_size=4, local_epochs=2),
    input_block=("features.conv0", "features.norm0"),
    output_block=("class_layers",),
)
