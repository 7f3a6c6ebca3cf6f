"""Local training and evaluation of a task model: device choice, AMP, the epoch loop.

Shared by the site worker, the server's evaluation and the baselines, so all
three train and score a model the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medfed.core.schema import WEIGHT_KEY
from medfed.tasks.base import Task
from medfed.tasks.optimizers import adam

_T = TypeVar("_T")


def select_device(preference: str = "auto") -> torch.device:
    """Return CUDA when present (or asked for and present), else the CPU."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError(
            "compute.device = 'cuda' but no CUDA device is visible; "
            "set compute.device = 'auto' or 'cpu' in site.toml"
        )
    return torch.device("cpu")


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    # bf16 autocast only pays off on CUDA; on CPU it slows the small convolutions.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays (CPU, contiguous), in state_dict order."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load numpy arrays into the model; keys and shapes must match exactly."""
    state = model.state_dict()
    missing = set(state) - set(weights)
    extra = set(weights) - set(state)
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    model.load_state_dict({k: torch.from_numpy(np.asarray(weights[k])) for k in state})


@dataclass(frozen=True)
class TrainStats:
    """What one call of :func:`train` reports."""

    loss: float
    num_examples: int
    steps: int


def train(
    task: Task,
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    device: torch.device,
    generator: torch.Generator,
    amp: bool = True,
    proximal_mu: float = 0.0,
    local_steps: int = 0,
    step_correction: list[torch.Tensor | None] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``data``; FedProx's proximal term when ``proximal_mu`` > 0.

    ``local_steps`` > 0: exactly that many steps, the data cycled (else ``epochs`` passes).
    ``step_correction``: one tensor (or None) per trainable parameter, subtracted from it
    after every step (SCAFFOLD's ``lr (c - c_i)``; :func:`medfed.tasks.trainer.correction_tensors`).
    """
    model.to(device).train()
    loss_fn = task.build_loss()
    optimizer = adam(model.parameters(), lr=learning_rate, weight_decay=task.defaults.weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total, seen, steps = 0.0, 0, 0
    for x, y in _round_batches(loader, epochs, local_steps):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = loss_fn(model(x), y)
        if anchor:
            pairs = zip(model.parameters(), anchor, strict=True)
            prox = sum(((p - a) ** 2).sum() for p, a in pairs)
            loss = loss + 0.5 * proximal_mu * prox
        loss.backward()
        optimizer.step()
        if step_correction is not None:
            with torch.no_grad():
                for p, offset in zip(trainable, step_correction, strict=True):
                    if offset is not None:
                        p.sub_(offset)
        total += float(loss.detach()) * len(x)
        seen += len(x)
        steps += 1
    return TrainStats(loss=total / max(seen, 1), num_examples=len(data), steps=steps)  # type: ignore[arg-type]


def _round_batches(loader: Iterable[_T], epochs: int, local_steps: int) -> Iterator[_T]:
    """``epochs`` passes over ``loader``; with ``local_steps`` > 0 exactly that many batches."""
    if local_steps <= 0:
        for _ in range(epochs):
            yield from loader
        return
    steps = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
            steps += 1
            if steps == local_steps:
                return
        if empty:
            raise ValueError("cannot take local steps on an empty dataset")


def _batches(data: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from DataLoader(data, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate(
    task: Task, model: nn.Module, data: Dataset, *, device: torch.device, batch_size: int = 32
) -> dict[str, float]:
    """Loss and the task's metrics of ``model`` on ``data``."""
    model.to(device).eval()
    loss_fn = task.build_loss()
    logits, targets, total = [], [], 0.0
    for x, y in _batches(data, batch_size):
        out = model(x.to(device)).float()
        total += float(loss_fn(out, y.to(device))) * len(x)
        logits.append(out.cpu())
        targets.append(y)
    n = len(data)  # type: ignore[arg-type]
    metrics = task.compute_metrics(torch.cat(logits), torch.cat(targets))
    return {"loss": total / max(n, 1), **metrics, WEIGHT_KEY: float(n)}
