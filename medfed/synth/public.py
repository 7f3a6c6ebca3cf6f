"""Public pretraining data: Colin27, another brain, under randomized scanner physics.

No hospital's images: each subject is the Colin27 brain (one man, scanned 27 times
and averaged; Debian's mricron-data, see :mod:`medfed.synth.colin27`) under a random
warp, seen through a scanner whose every setting is drawn at random (SynthSeg-style
domain randomization, Billot et al. 2023): tissue intensities in any order (T1-like,
T2-like or neither), contrast curve, bias field, noise, resolution and slice
thickness. A model trained on it knows brain anatomy and no particular scanner,
which is what a private (DP-SGD) fine-tuning at the sites then needs to learn least of.

Why this is a fair public source: the public and the site anatomy are different
brains. The benchmark's sites are warps of the MNI152 2009 template (the average of
152 subjects, :mod:`medfed.synth.template`); the public subjects are warps of
Colin27, a single subject. Their labels come from different protocols too: a
Gaussian mixture on Colin27's own T1 here, MNI152's tissue probability maps at the
sites. Both are on the same MNI-aligned grid, as a public dataset registered to a
standard space would be. Its random streams are disjoint from the sites'
(``PUBLIC_SITE_BASE`` above any site index), and no site's scanner profile is used.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medfed.synth.colin27 import load_colin27
from medfed.synth.generate import SubjectVolume, synthesize_subject
from medfed.synth.profiles import DEFAULT_PROFILES, ScannerProfile

#: Site indices of the public subjects start here, far above any benchmark site.
PUBLIC_SITE_BASE = 100_000
_PUBLIC_STREAM = 0x9AB11C


def random_profile(rng: np.random.Generator) -> ScannerProfile:
    """A scanner with every contrast, artefact and resolution setting drawn at random."""
    t2 = bool(rng.random() < 0.5)
    means = rng.uniform(0.05, 1.0, 3)
    return dataclasses.replace(
        DEFAULT_PROFILES[0],
        name="public-random",
        contrast="T2w" if t2 else "T1w",
        tissue_means=(float(means[0]), float(means[1]), float(means[2])),
        texture_gain=float(rng.uniform(0.0, 1.0)),
        gamma=float(np.exp(rng.normal(0.0, 0.3))),
        bias_strength=float(rng.uniform(0.0, 0.3)),
        noise=float(rng.uniform(0.01, 0.08)),
        in_plane_mm=float(rng.uniform(2.5, 3.5)),
        slice_spacing_mm=float(rng.uniform(3.0, 4.5)),
        slice_thickness_mm=float(rng.uniform(2.5, 4.0)),
        gain=float(rng.uniform(500, 3000)),
        lesion_contrast=float(rng.uniform(-0.5, 0.6)),
    )


def public_subjects(count: int, *, seed: int) -> list[SubjectVolume]:
    """``count`` domain-randomized Colin27 subjects; the same seed gives the same arrays."""
    if count <= 0:
        raise ValueError(f"public_subjects needs a positive count, got {count}")
    template = load_colin27()
    rng = np.random.default_rng([seed, _PUBLIC_STREAM])
    out = []
    for i in range(count):
        profile = random_profile(rng)
        out.append(
            synthesize_subject(
                profile,
                seed=seed,
                site_index=PUBLIC_SITE_BASE + i,
                subject_index=i,
                lesion=bool(rng.random() < 0.5),
                template=template,
            )
        )
    return out
