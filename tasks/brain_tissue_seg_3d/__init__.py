"""brain-tissue-seg-3d: CSF / grey matter / white matter in 3D, MONAI SegResNet on patches.

The real-size sibling of ``brain-tissue-seg`` (same subjects, labels and metrics): a
3D network that sees through-plane context, at the size of a published model.

Model: MONAI ``SegResNet`` (Myronenko 2018, "3D MRI brain tumor segmentation using
autoencoder regularization", the encoder-decoder without the VAE branch), 16 initial
filters, residual blocks ``(1, 2, 2, 5)`` down and ``(1, 1, 1)`` up, group norm (8
groups; no BatchNorm, so DP-SGD applies), 1 input channel, 4 output classes:
**5,586,196 parameters** (22 MB in float32). It is MONAI's BraTS layout (blocks
``(1, 2, 2, 4)``, 4.70 M) with one more residual block at the 128-feature bottleneck,
which carries the network past 5 M parameters where compute is cheapest (4^3 voxels
per 32^3 patch). Upsampling is trilinear plus a 1x1 convolution (no transposed
convolutions), activations ReLU; every layer with parameters is a ``Conv3d`` or a
``GroupNorm``, which medfed's per-sample gradient rules and ``torch.func.vmap``
both handle (:mod:`medfed.tasks.dp_rules`, :mod:`medfed.tasks.dp_vmap`).

Preprocessing (:func:`medfed.tasks.imaging.preprocess`): reorient to axial LPS,
resample to 3 mm isotropic, scale each volume's 1st..99th intensity percentiles to
0..1, pad/crop to 56x64x56 (168x192x168 mm, the whole brain at every site of the
benchmark).

Training: random 32^3 patches (96 mm cubes), :data:`PATCHES_PER_SCAN` per training
scan per epoch (:class:`RandomPatches`): each access draws a new patch from a
generator seeded by the site's data seed, centred on a brain voxel 3 times in 4 and
anywhere in the volume otherwise. A step of the default batch (2 patches, Adam) takes
about 0.5 s on one CPU core (torch 2.13; 2 threads on a loaded 2-core VM spent 4x the
CPU time), a DP-SGD step about as much (vmap's per-sample gradients); a site of 8 scans
(6 to train: 24 patches, 12 steps) trains an epoch in under 10 s, and scores a
validation scan in about 1 s. On CUDA the engine trains under bf16 autocast
(``compute.amp``, :func:`medfed.tasks.engine.train`), as it does every task.

Validation: whole volumes. The model (:class:`PatchSegResNet`) trains on patches
and, in eval mode, scores a larger input by MONAI's ``sliding_window_inference``
over windows of the training patch size (overlap 0.25, Gaussian blending), so group
norm sees at test time the field of view it was trained on, and memory stays that of
a few patches however large the volume.

Loss: Dice + cross-entropy per patch (``DiceCEOnLabels(batch=False)``), a mean of
per-sample terms as DP-SGD requires. Metrics: Dice per tissue over all validation
voxels pooled (``dice-csf``, ``dice-gm``, ``dice-wm``) and their mean, ``dice``.

Privacy units: a training example is one patch; ``SiteData.train_units`` maps each
to its scan (and patient), so ``privacy.unit = "scan"`` clips and accounts the
:data:`PATCHES_PER_SCAN` patches of a scan together. With ``privacy.unit = "sample"``
epsilon protects one patch draw, not a scan.

Public data: :func:`public_data` gives patches of the public Colin27 subjects, so
``medfed pretrain --task brain-tissue-seg-3d`` can make public weights; none ship
with medfed (``public_weights`` is ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.blocks.segresnet_block import ResBlock
from monai.networks.nets import SegResNet
from monai.networks.utils import one_hot
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.tasks.base import Hyperparameters, SiteData, Task
from medfed.tasks.brain_tissue_seg import labelled_split
from medfed.tasks.imaging import Subject, preprocess, public_atlas_subjects, unit_indices
from medfed.tasks.losses import DiceCEOnLabels

NAME = "brain-tissue-seg-3d"
#: Tissue classes after background, in label-value order.
CLASSES: tuple[str, ...] = ("csf", "gm", "wm")
#: Isotropic voxel size (mm) and the grid every scan is brought to.
PIXDIM_MM = 3.0
SHAPE = (56, 64, 56)
#: Edge (voxels) of the cubic training patches and of the evaluation windows.
PATCH = 32
#: Random patches per training scan per epoch.
PATCHES_PER_SCAN = 4
#: Share of patches centred on a brain voxel (the rest anywhere in the volume).
FOREGROUND_SHARE = 0.75
_PATCH_STREAM = 0x3D9A7


class _ResBlock(ResBlock):
    """MONAI's SegResNet ``ResBlock`` with its residual added out of place (same math).

    MONAI adds the residual in place (``x += identity``) onto the second convolution's
    output; Opacus's backward hooks (the DP-SGD fallback modes, and the tests'
    reference) refuse an in-place change of a hooked layer's output.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` plus the block's pre-activation residual branch of it."""
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class PatchSegResNet(SegResNet):
    """MONAI ``SegResNet`` that trains on patches and evaluates larger inputs by windows.

    In training mode, and on an input of exactly the window size, it is the plain
    ``SegResNet``. In eval mode a larger (or smaller) input is scored with MONAI's
    ``sliding_window_inference``: windows of ``roi_size``, ``overlap`` between
    neighbours, Gaussian blending, ``sw_batch_size`` windows per forward pass.
    The parameters and their names are ``SegResNet``'s; its residual blocks add
    out of place (:class:`_ResBlock`).
    """

    def __init__(
        self,
        *,
        roi_size: Sequence[int],
        overlap: float = 0.25,
        sw_batch_size: int = 4,
        **segresnet: object,
    ) -> None:
        super().__init__(**segresnet)  # type: ignore[arg-type]
        for block in self.modules():
            if type(block) is ResBlock:  # no state of its own: only forward differs
                block.__class__ = _ResBlock
        self.roi_size = tuple(int(s) for s in roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits ``(N, C, *spatial)`` of ``x (N, 1, *spatial)``."""
        if self.training or tuple(x.shape[2:]) == self.roi_size:
            return super().forward(x)
        return sliding_window_inference(  # type: ignore[return-value]
            x,
            self.roi_size,
            self.sw_batch_size,
            super().forward,
            overlap=self.overlap,
            mode="gaussian",
        )


def build_model(patch: int = PATCH) -> nn.Module:
    """SegResNet, 16 filters, blocks (1, 2, 2, 5) / (1, 1, 1), group norm: 5,586,196 parameters.

    ``patch``: the training patch edge, also the evaluation window (a multiple of 8,
    the network's three halvings).
    """
    if patch % 8:
        raise ValueError(f"the patch edge must be a multiple of 8 (3 halvings), got {patch}")
    return PatchSegResNet(
        roi_size=(patch,) * 3,
        spatial_dims=3,
        in_channels=1,
        out_channels=1 + len(CLASSES),
        init_filters=16,
        blocks_down=(1, 2, 2, 5),
        blocks_up=(1, 1, 1),
        norm=("GROUP", {"num_groups": 8}),
        act=("RELU", {"inplace": False}),
        upsample_mode="nontrainable",
    )


def build_loss() -> nn.Module:
    """Dice + cross-entropy (MONAI), per patch (``batch=False``: a sum of per-sample terms)."""
    return DiceCEOnLabels(1 + len(CLASSES), batch=False)


def compute_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Dice per tissue over all voxels of the split pooled, and their mean (MONAI DiceMetric).

    The ``(N, C, X, Y, Z)`` volumes are scored as one ``(1, C, N*X*Y*Z)`` volume,
    so a tissue missing from one volume does not make that volume's Dice undefined.
    """
    n_classes = logits.shape[1]
    pred = one_hot(logits.argmax(1, keepdim=True), num_classes=n_classes)
    true = one_hot(target.long(), num_classes=n_classes)
    pooled = lambda t: t.movedim(0, 1).reshape(1, n_classes, -1)  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    dice = metric(pooled(pred), pooled(true))[0]
    per_class = {f"dice-{name}": float(d) for name, d in zip(CLASSES, dice, strict=True)}
    return {**per_class, "dice": float(dice.mean())}


class RandomPatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``per_volume`` random cubic patches of each volume, a fresh draw on every access.

    Example ``i`` is a patch of volume ``i // per_volume``: so the length is the
    patches of one epoch, and each epoch (each round) sees new patches. Its corner
    comes from a generator seeded once with ``seed``: given the same order of
    accesses (the engine's seeded shuffling, single-process loading) the patches
    repeat exactly. A share ``foreground`` of the patches is centred on a voxel of
    label > 0 (brain), the rest uniformly anywhere; a patch always lies inside its
    volume. Worker processes of a ``DataLoader`` would each copy the generator and
    draw the same patches: load in the main process (as the engine does).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        size: int,
        per_volume: int,
        seed: int,
        foreground: float = FOREGROUND_SHARE,
    ) -> None:
        if images.dim() != 5 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"need (N, 1, X, Y, Z) images and labels, got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if any(s < size for s in images.shape[2:]):
            raise ValueError(f"patch edge {size} exceeds the volume {tuple(images.shape[2:])}")
        self.images, self.labels = images, labels
        self.size, self.per_volume, self.foreground = size, per_volume, foreground
        self._generator = torch.Generator().manual_seed(seed)
        # flat indices of each volume's brain voxels (int32: a volume has < 2^31)
        self._brain = [(lab.reshape(-1) > 0).nonzero()[:, 0].to(torch.int32) for lab in labels]

    def __len__(self) -> int:
        return len(self.images) * self.per_volume

    def corner(self, volume: int) -> tuple[int, ...]:
        """A random patch corner in ``volume`` (draws from the generator)."""
        spatial = self.images.shape[2:]
        brain = self._brain[volume]
        u = torch.rand(1, generator=self._generator).item()
        if u < self.foreground and len(brain):
            pick = int(brain[torch.randint(len(brain), (1,), generator=self._generator)])
            centre = torch.unravel_index(torch.tensor(pick), tuple(spatial))
            return tuple(
                min(max(int(c) - self.size // 2, 0), s - self.size)
                for c, s in zip(centre, spatial, strict=True)
            )
        return tuple(
            int(torch.randint(s - self.size + 1, (1,), generator=self._generator)) for s in spatial
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"patch {index} of {len(self)}")
        volume = (index % len(self)) // self.per_volume
        window = (slice(None), *(slice(c, c + self.size) for c in self.corner(volume)))
        # copies: a caller that changes a patch in place leaves the volume intact
        return self.images[volume][window].clone(), self.labels[volume][window].clone()


def _volumes(
    subjects: list[Subject], bias_correction: str = "off"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The subjects' image and label volumes, ``(N, 1, *SHAPE)`` each."""
    images, labels = [], []
    for subject in subjects:
        image, label = preprocess(
            subject, pixdim=(PIXDIM_MM,) * 3, spatial_size=SHAPE, bias_correction=bias_correction
        )
        assert label is not None  # only labelled subjects come here
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


def _patch_seed(seed: int) -> int:
    """The patch generator's seed for data seed ``seed`` (a stream of its own)."""
    return int(np.random.SeedSequence([int(seed), _PATCH_STREAM]).generate_state(1)[0])


def load_site_data(source: DataSourceConfig) -> SiteData:
    """The site's labelled scans split by subject: random patches to train, whole scans to score."""
    split = labelled_split(source, NAME)
    train = RandomPatches(
        *_volumes(split.train, source.bias_correction),
        size=PATCH,
        per_volume=PATCHES_PER_SCAN,
        seed=_patch_seed(source.seed),
    )
    val = TensorDataset(*_volumes(split.val, source.bias_correction))
    return SiteData(
        train=train,
        val=val,
        train_units=unit_indices(split.train, [PATCHES_PER_SCAN] * len(split.train)),
        description=split.description(len(train), len(val)),
    )


def public_data(subjects: int, seed: int) -> RandomPatches:
    """Public pretraining patches: Colin27 (mricron-data), another brain than the sites' MNI152.

    Labels from a Gaussian mixture on its own T1, random warps and scanners; no site's data.
    """
    images, labels = _volumes(public_atlas_subjects(subjects, seed=seed))
    return RandomPatches(
        images, labels, size=PATCH, per_volume=PATCHES_PER_SCAN, seed=_patch_seed(seed)
    )


TASK = Task(
    name=NAME,
    description="brain MRI tissue segmentation (CSF/GM/WM) in 3D, MONAI SegResNet "
    "(5.6 M parameters) on 32^3 patches",
    build_model=build_model,
    build_loss=build_loss,
    compute_metrics=compute_metrics,
    primary_metric="dice",
    load_site_data=load_site_data,
    # CPU-friendly: a step of 2 patches of 32^3 is about 0.5 s on a core; an epoch of a
    # site of 8 scans (6 for training) is 24 patches, 12 steps.
    defaults=Hyperparameters(learning_rate=1e-3, batch_size=2, local_epochs=1),
    # The stem and the full-resolution encoder level, the full-resolution decoder level
    # and the head (0.5% of the parameters): where a scanner's contrast shows.
    input_block=("convInit", "down_layers.0"),
    output_block=("up_samples.2", "up_layers.2", "conv_final"),
    public_data=public_data,
    public_weights=None,  # `medfed pretrain --task brain-tissue-seg-3d` makes them
)
