"""Contrast randomization at the site: random intensity curves on training images only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.core.config import DataSourceConfig, RunConfig
from medfed.tasks import get_task
from medfed.tasks.augmentation import contrast_randomized, random_curve


def test_a_random_curve_keeps_the_background_and_the_range_and_reorders_tissues() -> None:
    x = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0] * 20).reshape(10, 10)
    outs = [random_curve(x, np.random.default_rng(s)) for s in range(20)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.all(out[x == 0] == 0)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # Not always monotone: some curves swap the order of two intensities (contrast inverts).
    assert any(float(o[0, 1]) > float(o[0, 3]) for o in outs)
    assert torch.equal(random_curve(x, np.random.default_rng(3)), outs[3])
    assert torch.equal(random_curve(torch.zeros(4), np.random.default_rng(0)), torch.zeros(4))


@pytest.fixture(scope="module")
def site():
    task = get_task("tiny-seg")
    return task.load_site_data(DataSourceConfig(seed=1, profile=1, num_samples=40))


def test_about_half_the_training_images_are_remapped_and_labels_and_validation_are_not(site):
    aug = contrast_randomized(site, seed=7)
    assert aug.val is site.val
    changed = 0
    for i in range(len(site.train)):
        (x, y), (ax, ay) = site.train[i], aug.train[i]
        assert torch.equal(y, ay)
        changed += not torch.equal(torch.as_tensor(x), torch.as_tensor(ax))
    assert 0.25 * len(site.train) < changed < 0.75 * len(site.train)
    first = [contrast_randomized(site, seed=7).train[i][0] for i in range(5)]
    second = [contrast_randomized(site, seed=7).train[i][0] for i in range(5)]
    other = [contrast_randomized(site, seed=8).train[i][0] for i in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_simulated_run_with_contrast_randomization_trains_another_model(tmp_path: Path) -> None:
    from medfed.local.sim_sites import synthetic_sites
    from medfed.local.simulation import simulate

    def final(augmentation: str) -> dict[str, np.ndarray]:
        run = RunConfig(
            task="tiny-seg",
            rounds=1,
            min_sites=2,
            seed=4,
            secure_aggregation="off",
            augmentation=augmentation,
        )
        folder, summary = simulate(run, synthetic_sites(2), tmp_path / augmentation)
        assert summary.status == "completed", summary.reason
        with np.load(folder.checkpoint_file(1)) as z:
            return {k: z[k] for k in z.files}

    plain, augmented = final("off"), final("contrast")
    assert plain.keys() == augmented.keys()
    assert any(not np.array_equal(plain[k], augmented[k]) for k in plain)
    with pytest.raises(ValueError, match="augmentation"):
        RunConfig(task="tiny-seg", augmentation="flip")
