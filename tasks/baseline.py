"""Baselines beside federated results: pooled (centralized) and site-alone (local) training.

The cross-site matrix evaluates every model on every site's held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

from medfed.tasks import engine
from medfed.tasks.base import SiteData, Task

Mode = Literal["centralized", "local"]
Matrix = dict[str, dict[str, dict[str, float]]]  # model -> site -> metrics


@dataclass(frozen=True)
class BaselineResult:
    """Models trained by a baseline and their cross-site matrix."""

    mode: Mode
    models: dict[str, nn.Module]
    matrix: Matrix


def train_model(
    task: Task,
    data: torch.utils.data.Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    init: dict[str, np.ndarray] | None = None,
) -> nn.Module:
    """A fresh model of ``task`` (seeded as a federated run's, or ``init``) trained on ``data``."""
    torch.manual_seed(seed)
    model = task.build_model()
    if init is not None:
        engine.set_weights(model, init)
    engine.train(
        task,
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        device=device,
        generator=torch.Generator().manual_seed(seed),
    )
    return model


def cross_site(
    task: Task, models: dict[str, nn.Module], sites: dict[str, SiteData], *, device: torch.device
) -> Matrix:
    """Evaluate every model on every site's validation split."""
    return {
        name: {
            site: engine.evaluate(task, model, data.val, device=device)
            for site, data in sites.items()
        }
        for name, model in models.items()
    }


def run_baseline(
    task: Task,
    sites: dict[str, SiteData],
    mode: Mode,
    *,
    epochs: int,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    device: torch.device,
    seed: int = 0,
) -> BaselineResult:
    """Train pooled over all sites (``centralized``) or one model per site (``local``)."""
    hp = dict(
        epochs=epochs,
        batch_size=batch_size or task.defaults.batch_size,
        learning_rate=learning_rate or task.defaults.learning_rate,
        device=device,
        seed=seed,
    )
    if mode == "centralized":
        pooled = ConcatDataset([d.train for d in sites.values()])
        models = {"centralized": train_model(task, pooled, **hp)}
    else:
        models = {f"local:{site}": train_model(task, d.train, **hp) for site, d in sites.items()}
    return BaselineResult(mode, models, cross_site(task, models, sites, device=device))


def mean_over_sites(matrix: Matrix, metric: str) -> dict[str, float]:
    """Per model, the mean of ``metric`` over sites (each site counts once)."""
    return {name: sum(row[s][metric] for s in row) / len(row) for name, row in matrix.items()}
