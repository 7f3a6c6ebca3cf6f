"""Pooled training with the same site-specific capacity as a domain-adaptation hook.

A federation whose sites keep part of the model (``site-input-output``, ``fedbn``)
has more capacity than one pooled model: comparing the two flatters the federation.
The fair anchor is pooled training of the same shape: one model per site whose
shared parameters are the same tensors in every site's model (tied) and whose
hook-local parameters are each site's own, trained on every site's batches in one
seeded interleaved order (the pooled data, each batch through its site's model), one
Adam over the union of the parameters. Evaluated per site with the site's model,
as a federated site scores the shared model with its own local parameters.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medfed.tasks import engine
from medfed.tasks.adaptation import local_keys
from medfed.tasks.base import SiteData, Task
from medfed.tasks.optimizers import adam


def _tie(site_model: nn.Module, base: nn.Module, shared: set[str]) -> None:
    """Make ``site_model``'s shared parameters and buffers ``base``'s own tensors."""
    for name in shared:
        owner_name, _, attr = name.rpartition(".")
        owner = site_model.get_submodule(owner_name) if owner_name else site_model
        source = base.get_submodule(owner_name) if owner_name else base
        if attr in owner._parameters:
            owner._parameters[attr] = source._parameters[attr]
        else:
            owner._buffers[attr] = source._buffers[attr]


def site_models(
    task: Task,
    adaptation: str,
    sites: list[str],
    *,
    seed: int,
    init: dict[str, np.ndarray] | None = None,
) -> dict[str, nn.Module]:
    """One model per site: shared parameters tied, ``adaptation``'s local ones per site.

    Every site's model starts from the same weights: seeded, or ``init``.
    """
    torch.manual_seed(seed)
    base = task.build_model()
    if init is not None:
        engine.set_weights(base, init)
    local = local_keys(task, base, adaptation)
    shared = set(base.state_dict()) - local
    models = {}
    for site in sites:
        model = copy.deepcopy(base)  # local parameters start equal, as in a federated run
        _tie(model, base, shared)
        models[site] = model
    return models


def train_site_specific(
    task: Task,
    sites: dict[str, SiteData],
    adaptation: str,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    seed: int,
    init: dict[str, np.ndarray] | None = None,
) -> dict[str, nn.Module]:
    """Pooled training of :func:`site_models`; each site's model, trained."""
    models = site_models(task, adaptation, list(sites), seed=seed, init=init)
    unique = {id(p): p for m in models.values() for p in m.parameters()}
    for m in models.values():
        m.to(device).train()
    params = list(unique.values())
    optimizer = adam(params, lr=learning_rate, weight_decay=task.defaults.weight_decay)
    loss_fn = task.build_loss()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        loaders = {
            s: iter(DataLoader(d.train, batch_size=batch_size, shuffle=True, generator=gen))
            for s, d in sites.items()
        }
        order = [s for s, d in sites.items() for _ in range(-(-len(d.train) // batch_size))]
        for i in torch.randperm(len(order), generator=gen).tolist():
            x, y = next(loaders[order[i]])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(models[order[i]](x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
    return models


def evaluate_site_specific(
    task: Task,
    models: dict[str, nn.Module],
    data: dict[str, torch.utils.data.Dataset],
    *,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Each site's data scored by its own model."""
    return {s: engine.evaluate(task, models[s], d, device=device) for s, d in data.items()}
