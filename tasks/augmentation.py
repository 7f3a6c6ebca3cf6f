"""Contrast randomization at the site: one shared model that reads every scanner's contrast.

Histogram standardization (:mod:`medfed.tasks.harmonization`) maps intensities
monotonically, so it cannot turn a T2-weighted scan (CSF bright, WM dark) into a
T1-weighted one; FedAvg then averages three T1 sites' updates with one T2 site's and
the shared model fails at the T2 site. Contrast randomization (the domain
randomization of SynthSeg, Billot et al. 2023, applied to the sites' own training
images) remaps half of each site's training images by a random intensity curve, not
necessarily monotone: every site's local training then sees inverted and reordered
tissue contrasts, its update no longer pulls the shared model towards its own
scanner alone, and one global model serves every site. Labels are untouched;
validation and test images are never remapped.

The curve is piecewise linear through ``KNOTS`` knots over the image's own intensity
range: 0 stays 0 (background), the other knots are uniform draws. It is a
per-example transform, so DP-SGD's per-sample (or per-scan) clipping and accounting
are unchanged, and nothing of it leaves the site.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medfed.tasks.base import SiteData

#: Knots of the random intensity curve (0 and the image's maximum included).
KNOTS = 6
#: Share of training images remapped; the rest keep their scanner's contrast.
PROBABILITY = 0.5
_STREAM = 0xC0A7


def random_curve(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``x`` remapped by a random piecewise-linear curve over ``[0, max(x)]`` (0 kept)."""
    top = float(x.max())
    if top <= 0:
        return x
    knots_y = np.concatenate([[0.0], rng.uniform(0.0, 1.0, KNOTS - 1)]) * top
    knots_x = np.linspace(0.0, top, KNOTS)
    flat = x.detach().reshape(-1).to(torch.float64).clamp(min=0.0).numpy()
    mapped = np.interp(flat, knots_x, knots_y)
    out = torch.from_numpy(mapped).to(x.dtype).reshape(x.shape)
    return torch.where(x > 0, out, x)


class _ContrastRandomized(Dataset[Any]):
    """``base`` with each fetched image remapped by a fresh curve, with ``PROBABILITY``."""

    def __init__(self, base: Dataset[Any], seed: int) -> None:
        self.base = base
        self.rng = np.random.default_rng([seed, _STREAM])

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        x, *rest = self.base[i]
        if self.rng.random() < PROBABILITY:
            x = random_curve(torch.as_tensor(x), self.rng)
        return (x, *rest)


def contrast_randomized(data: SiteData, *, seed: int) -> SiteData:
    """The site's data with its training split contrast-randomized (validation as is)."""
    return replace(data, train=_ContrastRandomized(data.train, seed))
