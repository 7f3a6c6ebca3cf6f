"""The task contract: everything a site and the server need to train and evaluate a task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from medfed.core.config import DataSourceConfig


@dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """Default local-training settings of a task; a run may override them."""

    learning_rate: float = 1e-3
    batch_size: int = 16
    local_epochs: int = 1
    weight_decay: float = 0.0


@dataclass(frozen=True, kw_only=True)
class SiteData:
    """A site's data for one task: a training and a held-out validation split."""

    train: Dataset[Any]
    val: Dataset[Any]
    description: dict[str, Any] = field(default_factory=dict)  # counts only, no identifiers
    #: For a privacy unit coarser than one example (``"scan"``, ``"patient"``), the unit
    #: each training example belongs to: one integer per example (a slice's scan; both
    #: copies of a mirrored scan). DP-SGD with ``privacy.unit`` set to it samples and
    #: clips per unit, and is refused (fail closed) for a unit the task leaves out.
    train_units: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The same for the validation examples (``"scan"``), where one scan gives several:
    #: what per-scan preprocessing at run time (intensity harmonization) groups by.
    val_units: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Task:
    """A registered task.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"tiny-seg"``.
    description : str
        One line for ``medfed tasks``.
    build_model : Callable[[], nn.Module]
        Returns a fresh model; DP-compatible by construction (no BatchNorm).
    build_loss : Callable[[], nn.Module]
        Returns the loss (a MONAI loss), called as ``loss(logits, target)``.
    compute_metrics : Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
        Maps stacked logits and targets of a split to named metrics (MONAI metrics).
    primary_metric : str
        The metric reports and plots lead with (higher is better).
    load_site_data : Callable[[DataSourceConfig], SiteData]
        Builds the site's splits from its declared data source.
    defaults : Hyperparameters
        Default local-training hyperparameters.
    input_block : tuple[str, ...]
        Module names of the model's first block (what first sees the image's
        intensities), which the ``site-input-block`` adaptation keeps at each site.
    output_block : tuple[str, ...]
        Module names of the model's last block (the prediction head), which the
        ``site-input-output`` adaptation keeps at each site beside the input block.
    public_data : Callable[[int, int], Dataset] or None
        Labelled *public* training data, ``(subjects, seed) -> dataset`` (never a
        site's data): what ``medfed pretrain`` trains the task's public weights on.
    public_weights : Path or None
        The weights pretrained on ``public_data`` that ship with the task (an ``.npz``
        of the model's ``state_dict``, with a ``.json`` recipe beside it); a run with
        ``init_weights = "public"`` starts from them (:mod:`medfed.tasks.pretrain`).
    public_standard : Callable[[int, int], tuple[numpy.ndarray, int]] or None
        The mean intensity landmarks of the public data's scans, ``(subjects, seed) ->
        (landmarks, scans)``: ``medfed pretrain`` stores them in the public weights'
        recipe, and harmonization ``"histogram-public"`` maps every site's scans onto
        them (:mod:`medfed.tasks.harmonization`).
    """

    name: str
    description: str
    build_model: Callable[[], nn.Module]
    build_loss: Callable[[], nn.Module]
    compute_metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    primary_metric: str
    load_site_data: Callable[[DataSourceConfig], SiteData]
    defaults: Hyperparameters = field(default_factory=Hyperparameters)
    input_block: tuple[str, ...] = ()
    output_block: tuple[str, ...] = ()
    public_data: Callable[[int, int], Dataset[Any]] | None = None
    public_weights: Path | None = None
    public_standard: Callable[[int, int], tuple[Any, int]] | None = None
