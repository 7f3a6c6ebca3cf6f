"""A site's local training behind one interface: plain and DP-SGD, given the same round.

What a round asks of local training (epochs, batch size, learning rate and every
client-side strategy option, such as FedProx's proximal term) is one value,
:class:`RoundOptions`; each :class:`Trainer` takes all of it, so an option cannot be
honoured by one training loop and dropped by the other (as ``proximal_mu`` once was
under DP-SGD).

Two options generalise what a strategy may ask of a site's loop:

- ``local_steps`` > 0: exactly that many optimizer steps, the data cycled as needed
  (instead of ``epochs``); SCAFFOLD needs the same K at every site.
- ``step_correction``: a constant per parameter subtracted from it after every optimizer
  step (SCAFFOLD's ``lr (c - c_i)``: with plain SGD the same as adding ``c - c_i`` to the
  gradient, and unlike that not rescaled by Adam nor accumulated by momentum). Under
  DP-SGD it comes after clipping and noise, like the proximal term: it depends on no
  example of this round, so it costs no privacy and is neither clipped nor mistaken
  for data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from medfed.core.privacy_accounting import AccountantName
from medfed.tasks import engine
from medfed.tasks.base import Task


@dataclass(frozen=True)
class RoundOptions:
    """What one round asks of local training: the run's shape and the strategy's options."""

    epochs: int
    batch_size: int
    learning_rate: float
    #: FedProx's proximal term (0: none), sent by the strategy in the round's config.
    proximal_mu: float = 0.0
    #: Exactly this many local steps (0: ``epochs`` passes over the data), e.g. SCAFFOLD's K.
    local_steps: int = 0
    #: Subtracted from each named parameter after every step (SCAFFOLD's lr (c - c_i)).
    step_correction: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.proximal_mu < 0:
            raise ValueError(
                f"the strategy's proximal-mu is {self.proximal_mu}; expected a value >= 0 "
                "(strategy option proximal_mu)"
            )
        if self.local_steps < 0:
            raise ValueError(
                f"the strategy's local-steps is {self.local_steps}; expected a value >= 0 "
                "(strategy option local_steps)"
            )
        if self.step_correction is not None and self.local_steps <= 0:
            raise ValueError(
                "the strategy sent a step correction (a control variate) without a "
                "fixed number of local steps; expected local_steps > 0 (strategy option "
                "local_steps)"
            )


def correction_tensors(
    model: nn.Module, correction: Mapping[str, np.ndarray] | None, device: torch.device
) -> list[torch.Tensor | None] | None:
    """``correction`` as one tensor (or None) per trainable parameter of ``model``, in order.

    A name that is no trainable parameter, or a shape that differs, is refused
    (ValueError): a correction that cannot be applied must not be dropped silently.
    """
    if correction is None:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {n for n, _ in named}
    state = set(model.state_dict())
    unknown = [k for k in correction if k not in names and k not in state]
    if unknown:
        raise ValueError(f"step correction for unknown parameters {sorted(unknown)[:3]}")
    out: list[torch.Tensor | None] = []
    for name, p in named:
        value = correction.get(name)
        if value is None:
            out.append(None)
            continue
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(
                f"step correction of {name!r} has shape {tuple(value.shape)}, "
                f"the parameter {tuple(p.shape)}"
            )
        out.append(torch.as_tensor(np.asarray(value), dtype=p.dtype, device=device))
    return out


class TrainResult(Protocol):
    """What every trainer reports (``engine.TrainStats`` and ``dp.DPTrainStats`` both)."""

    loss: float
    num_examples: int
    steps: int


class Trainer(Protocol):
    """Trains a model in place for one round at a site."""

    #: "off" (plain) or "sample" (DP-SGD): the privacy mode it implements.
    mode: str

    def train(
        self, task: Task, model: nn.Module, data: Dataset[Any], options: RoundOptions
    ) -> TrainResult:
        """Train ``model`` in place on ``data`` as ``options`` ask; report what it did."""
        ...


@dataclass(frozen=True)
class PlainTrainer:
    """Non-private training (Adam, AMP on CUDA); seeded, so a rerun trains the same way."""

    device: torch.device
    seed: int
    amp: bool = True
    mode: str = "off"

    def train(
        self, task: Task, model: nn.Module, data: Dataset[Any], options: RoundOptions
    ) -> TrainResult:
        """Plain local training with every option of ``options``."""
        return engine.train(
            task,
            model,
            data,
            epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            device=self.device,
            generator=torch.Generator().manual_seed(self.seed),
            amp=self.amp,
            proximal_mu=options.proximal_mu,
            local_steps=options.local_steps,
            step_correction=correction_tensors(model, options.step_correction, self.device),
        )


@dataclass(frozen=True)
class DpSgdTrainer:
    """DP-SGD (Opacus): per-unit clipping, Poisson sampling, noise from OS entropy."""

    device: torch.device
    noise_multiplier: float
    max_grad_norm: float
    accountant: AccountantName = "rdp"
    optimizer: Literal["adam", "sgd"] = "adam"
    average_iterates: float = 0.0
    #: The privacy unit each training example belongs to (None: each example is one).
    units: torch.Tensor | None = None
    mode: str = "sample"

    def train(
        self, task: Task, model: nn.Module, data: Dataset[Any], options: RoundOptions
    ) -> TrainResult:
        """DP-SGD local training with every option of ``options``."""
        from medfed.tasks.dp import dp_train  # Opacus loads only where DP-SGD runs

        return dp_train(
            task,
            model,
            data,
            epochs=options.epochs,
            batch_size=options.batch_size,
            learning_rate=options.learning_rate,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            device=self.device,
            accountant=self.accountant,
            optimizer=self.optimizer,
            average_iterates=self.average_iterates,
            units=self.units,
            proximal_mu=options.proximal_mu,
            local_steps=options.local_steps,
            step_correction=correction_tensors(model, options.step_correction, self.device),
        )
