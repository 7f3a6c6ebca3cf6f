"""Intensity harmonization at the site: histogram standardization on federated landmarks.

Scanners map the same tissue to different intensities. medfed's preprocessing already
scales each scan so that its 1st..99th percentiles span 0..1 (``tasks/imaging.py``);
what stays different between scanners is the *shape* of the intensity histogram
(contrast curves, gains per tissue). Histogram standardization (Nyúl & Udupa 2000;
Nyúl, Udupa & Zhang 2000) maps each scan's intensity landmarks, its percentiles
``LANDMARK_PERCENTILES`` within its foreground, piecewise-linearly onto one standard
set of landmarks, so the same tissue lands on about the same value at every site.

The standard is agreed federatively (``run.harmonization = "histogram"``): before the
first round the server asks every site for the mean landmark vector of its training
scans (:func:`site_landmarks`), averages them weighted by the sites' scan counts
(:func:`federated_standard`) and sends the result with every train and evaluate
message; each site maps its training *and* validation scans onto it
(:func:`harmonize`) before it trains or scores.

What the landmarks reveal, and how they are kept: 11 numbers per site, the mean over
its training scans of their foreground intensity quantiles, plus the number of scans.
They describe the site's scanner and protocol (a fingerprint of its contrast), and
through tissue proportions something of its population (e.g. more CSF with atrophy);
with few scans they come close to one patient's own histogram. They are not covered
by DP-SGD's epsilon, so a site refuses to send them under any DP mode (rule
``privacy.mode``: fail closed, nothing un-accounted leaves), and under secure
aggregation, whose point is that the server never sees one site's statistics in the
clear, only when its operator allowed it (``policy.share_landmarks = true``).

Under DP: the public standard (``run.harmonization = "histogram-public"``). The
standard need not come from the sites. A task that ships public weights can ship the
mean landmarks of the same public scans it was pretrained on (``medfed pretrain``
stores them in the weights' recipe, :func:`medfed.tasks.pretrain.load_public_standard`);
the server sends those, asks no site anything, and each site maps its scans onto them.
Nothing about any site's intensities leaves it, so the mode runs under every DP mode
and under secure aggregation without ``policy.share_landmarks``, at no privacy cost;
the sites' inputs then also look like the data the public weights were trained on.
What it gives up: the standard is one public brain under randomized scanners, not the
federation's own mean.

Per-scan mapping: a scan's mapping depends on all its voxels, and on nothing outside
it. Under DP-SGD per scan or per patient the unit holds the whole scan (the
preprocessing's per-scan percentile scaling has the same property). Per slice, a
slice's mapped values depend on its scan's other slices: the same holds of that
percentile scaling, which every DP mode already accepts; ``privacy.unit = "scan"``
is the unit that covers both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from medfed.tasks.base import SiteData

#: The landmarks: these percentiles of each scan's foreground intensities.
LANDMARK_PERCENTILES = (1.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.0)
#: Landmarks closer than this are spread apart, so that every segment has a slope.
MIN_GAP = 1e-6


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that best separates two intensity classes."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)[:-1].astype(np.float64)  # voxels at or below each cut
    above = hist.sum() - below
    sum_below = np.cumsum(hist * centers)[:-1]
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (np.sum(hist * centers) - sum_below) / np.maximum(above, 1)
    between = below * above * (mean_below - mean_above) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def scan_landmarks(image: torch.Tensor) -> np.ndarray:
    """One scan's landmarks: ``LANDMARK_PERCENTILES`` of its foreground voxels.

    Foreground: voxels above the scan's Otsu threshold (the head, not the air around
    it, which after resampling is not exactly at the minimum); a scan where that leaves
    nothing is taken whole.
    """
    values = image.detach().reshape(-1).double()
    foreground = values[values > otsu_threshold(values.numpy())]
    if foreground.numel() < len(LANDMARK_PERCENTILES):
        foreground = values
    q = torch.tensor(LANDMARK_PERCENTILES, dtype=torch.float64) / 100.0
    return _increasing(torch.quantile(foreground, q).numpy())


def _increasing(landmarks: np.ndarray) -> np.ndarray:
    """``landmarks`` made strictly increasing (ties spread by ``MIN_GAP``)."""
    out = np.maximum.accumulate(np.asarray(landmarks, dtype=np.float64))
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + MIN_GAP)
    return out


def standardize(image: torch.Tensor, landmarks: np.ndarray, standard: np.ndarray) -> torch.Tensor:
    """Map ``image`` piecewise-linearly so that ``landmarks`` land on ``standard``.

    Continuous and non-decreasing; below the first and above the last landmark the end
    segments go on (Nyúl's extension), so no intensity is clipped.
    """
    xp = torch.as_tensor(_increasing(landmarks), dtype=torch.float64)
    fp = torch.as_tensor(np.asarray(standard, dtype=np.float64))
    if xp.shape != fp.shape or len(xp) < 2:
        raise ValueError(f"landmarks {tuple(xp.shape)} and standard {tuple(fp.shape)} differ")
    v = image.double()
    segment = torch.bucketize(v, xp[1:-1])  # 0 .. L-2: the segment each value falls in
    slope = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    out = fp[segment] + slope[segment] * (v - xp[segment])
    return out.to(image.dtype)


def federated_standard(landmarks: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The sites' landmark vectors averaged with ``weights`` (their scan counts)."""
    if not landmarks or len(landmarks) != len(weights) or min(weights) <= 0:
        raise ValueError("expected one positive weight per site's landmarks, and some sites")
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in landmarks])
    if stacked.shape[1] != len(LANDMARK_PERCENTILES):
        raise ValueError(
            f"landmark vectors of {stacked.shape[1]} values, expected {len(LANDMARK_PERCENTILES)}"
        )
    w = np.asarray(weights, dtype=np.float64)
    return _increasing((w[:, None] * stacked).sum(axis=0) / w.sum())


def _scans(dataset: Dataset[Any], units: torch.Tensor | None) -> list[list[int]]:
    """The examples of each scan (``units``: each example's scan; None: one scan each)."""
    n = len(dataset)  # type: ignore[arg-type]
    if units is None:
        return [[i] for i in range(n)]
    groups: dict[int, list[int]] = {}
    for i, u in enumerate(units.tolist()):
        groups.setdefault(int(u), []).append(i)
    return list(groups.values())


def _scan_image(dataset: Dataset[Any], members: list[int]) -> torch.Tensor:
    return torch.cat([torch.as_tensor(dataset[i][0]).reshape(-1) for i in members])


def mean_landmarks(dataset: Dataset[Any], scans: torch.Tensor | None) -> tuple[np.ndarray, int]:
    """The mean landmark vector of ``dataset``'s scans (``scans``: each example's), and how many."""
    groups = _scans(dataset, scans)
    per_scan = [scan_landmarks(_scan_image(dataset, m)) for m in groups]
    return np.mean(per_scan, axis=0), len(per_scan)


def site_landmarks(data: SiteData) -> tuple[np.ndarray, int]:
    """The mean landmark vector of the site's training scans, and how many scans."""
    return mean_landmarks(data.train, data.train_units.get("scan"))


class _Standardized(Dataset[Any]):
    """``base`` with each example's image mapped by its scan's landmarks."""

    def __init__(self, base: Dataset[Any], units: torch.Tensor | None, standard: np.ndarray):
        self.base = base
        self.scan_of: dict[int, int] = {}
        self.landmarks: list[np.ndarray] = []
        for k, members in enumerate(_scans(base, units)):
            self.landmarks.append(scan_landmarks(_scan_image(base, members)))
            self.scan_of.update(dict.fromkeys(members, k))
        self.standard = np.asarray(standard, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        x, *rest = self.base[i]
        mapped = standardize(torch.as_tensor(x), self.landmarks[self.scan_of[i]], self.standard)
        return (mapped, *rest)


def harmonize(data: SiteData, standard: Sequence[float]) -> SiteData:
    """The site's data with every training and validation scan mapped onto ``standard``.

    Training scans are grouped by ``train_units["scan"]`` (slices of one scan share its
    mapping); validation scans by ``val_units["scan"]`` when the task gives it, else each
    example is taken as one scan.
    """
    target = np.asarray(standard, dtype=np.float64)
    if target.shape != (len(LANDMARK_PERCENTILES),) or np.any(np.diff(target) <= 0):
        raise ValueError(
            f"the standard landmarks must be {len(LANDMARK_PERCENTILES)} increasing values"
        )
    return replace(
        data,
        train=_Standardized(data.train, data.train_units.get("scan"), target),
        val=_Standardized(data.val, data.val_units.get("scan"), target),
    )
