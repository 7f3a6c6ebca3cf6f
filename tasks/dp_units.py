"""The privacy unit DP-SGD samples: each example, or each scan or patient (all its examples)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from medfed.core.errors import MedfedError
from medfed.tasks.dp_modes import first_samples


class UnitUnknown(MedfedError):
    """``privacy.unit`` names a unit the task does not map its training examples to."""


def privacy_units(num_examples: int, units: dict[str, torch.Tensor], unit: str) -> int:
    """How many units DP-SGD samples from: the examples, or the scans or patients.

    ``units`` is ``SiteData.train_units``.

    Raises
    ------
    UnitUnknown
        The task does not say which ``unit`` each example belongs to: counting each
        example as one could protect a slice while claiming a whole scan or patient.
    """
    if unit == "sample":
        return num_examples
    if unit not in units:
        known = ", ".join(repr(u) for u in ("sample", *units))
        raise UnitUnknown(
            f"The run asks for privacy.unit = {unit!r}, but this site's training examples "
            f"are not mapped to a {unit} (only to: {known}).",
            where="the task's load_site_data (SiteData.train_units)",
            expected=f"the {unit} of every training example"
            + (": every scan's DICOM PatientID" if unit == "patient" else ""),
            fix="ask for one of the units this site knows, or fill in what is missing "
            "(for 'patient': PatientID in every series)",
        )
    return int(torch.unique(units[unit]).numel())


def unit_members(units: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The example indices of each unit, in unit order."""
    if units.shape != (n,):
        raise MedfedError(
            f"The task gave {tuple(units.shape)} unit indices for {n} training examples.",
            where="SiteData.train_units",
            expected="one unit index per training example",
            fix="return train_units with one integer per example from load_site_data",
        )
    _, inverse = torch.unique(units, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    return list(torch.split(order, torch.bincount(inverse).tolist()))


def unit_batch(
    dataset: Dataset[Any], members: list[torch.Tensor], drawn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The examples of the drawn units, and for each example its unit's place in the draw."""
    parts = [members[i] for i in drawn.tolist()]
    if not parts:
        x, y = first_samples(dataset, 1)
        return x[:0], y[:0], torch.zeros(0, dtype=torch.long)
    index = torch.cat(parts)
    owner = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor([len(m) for m in parts]))
    if isinstance(dataset, TensorDataset):
        x, y = (t[index] for t in dataset.tensors)
    else:
        x, y = default_collate([dataset[i] for i in index.tolist()])
    return x, y, owner
