"""brain-tissue-seg-3d: a real-size 3D SegResNet on patches, plain and DP-SGD training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.synth import synthesize_sites
from medfed.tasks import SiteData, dp, dp_modes, dp_rules, dp_validation, engine, get_task
from medfed.tasks.adaptation import ADAPTATIONS
from medfed.tasks.brain_tissue_seg_3d import (
    PATCH,
    PATCHES_PER_SCAN,
    SHAPE,
    RandomPatches,
    _ResBlock,
)

CPU = torch.device("cpu")
TASK = get_task("brain-tissue-seg-3d")


@pytest.fixture(scope="module")
def data() -> SiteData:
    """2 synthesized subjects in memory: 1 to train (4 patches an epoch), 1 to score."""
    return TASK.load_site_data(DataSourceConfig(num_samples=16, seed=3))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_the_model_is_real_size_and_dp_ready() -> None:
    model = TASK.build_model()
    assert sum(p.numel() for p in model.parameters()) == 5_586_196  # the docstring's count
    assert dp_validation.validate_for_dp(model) == []  # no BatchNorm, nothing in place
    assert dp_rules.unsupported(model) == []  # a per-sample rule for every layer
    for name in ("site-input-block", "site-input-output"):  # the blocks name real modules
        assert list(ADAPTATIONS.get(name).local_parameters(TASK, model))
    x = torch.rand(1, 1, PATCH, PATCH, PATCH)
    assert model(x).shape == (1, 4, PATCH, PATCH, PATCH)
    block = model.down_layers[1][1]
    assert type(block) is _ResBlock  # MONAI's block, its residual added out of place
    with torch.no_grad():
        h = torch.rand(1, 32, 8, 8, 8)
        torch.testing.assert_close(block(h), super(_ResBlock, block).forward(h.clone()))


def test_evaluation_runs_sliding_windows_of_the_patch_size() -> None:
    torch.manual_seed(0)
    model = TASK.build_model().eval()
    patch = torch.rand(1, 1, PATCH, PATCH, PATCH)
    with torch.no_grad():
        torch.testing.assert_close(model(patch), super(type(model), model).forward(patch))
        assert model(torch.rand(1, 1, PATCH + 8, PATCH, PATCH - 8)).shape == (
            1,
            4,
            PATCH + 8,
            PATCH,
            PATCH - 8,
        )
    target = torch.randint(0, 4, (2, 1, 8, 8, 8))
    perfect = torch.nn.functional.one_hot(target[:, 0], 4).movedim(-1, 1).float()
    metrics = TASK.compute_metrics(perfect, target)
    assert metrics == {"dice-csf": 1.0, "dice-gm": 1.0, "dice-wm": 1.0, "dice": 1.0}


def test_random_patches_are_inside_seeded_and_fresh_each_access() -> None:
    shape = (40, 36, 34)
    images = torch.arange(2 * 40 * 36 * 34, dtype=torch.float32).reshape(2, 1, *shape)
    labels = torch.zeros(2, 1, 40, 36, 34, dtype=torch.long)
    labels[:, :, 20:24, 10:14, 5:9] = 2  # a small "brain" near one side
    patches = RandomPatches(images, labels, size=16, per_volume=3, seed=5, foreground=1.0)
    again = RandomPatches(images, labels, size=16, per_volume=3, seed=5, foreground=1.0)
    assert len(patches) == 6
    first = [patches[i] for i in range(6)]
    for i, (x, y) in enumerate(first):
        assert x.shape == y.shape == (1, 16, 16, 16)
        assert (y > 0).any()  # centred on the label
        volume, *corner = torch.unravel_index(x[0, 0, 0, 0].long(), (2, *shape))
        assert volume == i // 3
        window = tuple(slice(int(c), int(c) + 16) for c in corner)
        assert torch.equal(x, images[volume][(slice(None), *window)])  # inside, one piece
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(first, (again[i] for i in range(6)), strict=True)
    )
    assert not all(torch.equal(patches[0][0], patches[0][0]) for _ in range(5))  # new draws
    with pytest.raises(IndexError):
        patches[6]


def test_the_site_loader_reads_a_synthesized_dicom_site(tmp_path: Path) -> None:
    synthesize_sites(tmp_path, sites=1, subjects_per_site=2, seed=7, lesion_fraction=0.5)
    source = DataSourceConfig(kind="dicom-folder", path=str(tmp_path / "site-1"), val_fraction=0.5)
    site = TASK.load_site_data(source)
    assert site.description["subjects-train"] == site.description["subjects-val"] == 1
    assert len(site.train) == PATCHES_PER_SCAN and len(site.val) == 1
    x, y = site.train[0]
    assert x.shape == y.shape == (1, PATCH, PATCH, PATCH) and x.dtype == torch.float32
    assert set(torch.unique(site.val.tensors[1]).tolist()) == {0, 1, 2, 3}
    assert site.val.tensors[0].shape == (1, 1, *SHAPE)
    assert torch.equal(site.train_units["scan"], torch.zeros(PATCHES_PER_SCAN, dtype=torch.long))


def test_a_few_training_steps_on_patches_lower_the_loss(data: SiteData) -> None:
    x, y = dp_modes.first_samples(data.train, 2)
    torch.manual_seed(0)
    model = TASK.build_model()
    loss_fn = TASK.build_loss()
    with torch.no_grad():
        before = float(loss_fn(model(x), y))
    start = _params(model)
    stats = engine.train(
        TASK,
        model,
        TensorDataset(x, y),
        epochs=2,
        batch_size=2,
        learning_rate=TASK.defaults.learning_rate,
        device=CPU,
        generator=torch.Generator().manual_seed(0),
    )
    assert stats.steps == 2
    with torch.no_grad():
        after = float(loss_fn(model(x), y))
    assert after < before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(start[k], p) for k, p in model.named_parameters())


def test_one_dp_sgd_round_per_scan_trains_the_real_size_model(data: SiteData) -> None:
    # The site worker's entry (client/worker.py): dp_train, here with privacy.unit = "scan".
    # vmap is the mode dp_train's probe picks for this model on a CPU; the probe itself
    # (on this task too) is tested in test_privacy_dp_training.py.
    torch.manual_seed(0)
    model = TASK.build_model()
    start = _params(model)
    units = data.train_units["scan"]
    assert units.tolist() == [0] * PATCHES_PER_SCAN  # one training scan: its patches
    stats = dp.dp_train(
        TASK,
        model,
        data.train,
        epochs=1,
        batch_size=1,
        learning_rate=TASK.defaults.learning_rate,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=CPU,
        units=units,
        grad_sample_mode="vmap",
        generator=torch.Generator().manual_seed(1),
    )
    # one step at sampling rate 1: the scan is drawn, its 4 patches clipped as one unit
    assert stats.history == [(1.0, 1.0, 1)] and stats.empty_batches == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(start[k], p) for k, p in model.named_parameters())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
