"""N4 bias-field correction (SimpleITK) removes a smooth multiplicative field; sites opt in."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from monai.data import MetaTensor

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.tasks import get_task
from medfed.tasks.bias_field import n4_correct


def _phantom(field_strength: float) -> tuple[MetaTensor, np.ndarray]:
    """A head of two tissues (1.0 inside, 0.6 around) on a 3 x 3 x 4 mm grid, times a field."""
    gen = np.random.default_rng(0)
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, 48), np.linspace(-1, 1, 56), np.linspace(-1, 1, 32), indexing="ij"
    )
    r = np.sqrt(x**2 + y**2 + z**2)
    inner = r < 0.5
    volume = np.where(inner, 1.0, np.where(r < 0.85, 0.6, 0.0))
    field = np.exp(field_strength * (x + 0.5 * y))  # smooth, like a receive coil's
    noisy = volume * field + 0.01 * gen.standard_normal(volume.shape)
    image = MetaTensor(
        torch.as_tensor(noisy[None], dtype=torch.float32),
        affine=torch.diag(torch.tensor([3.0, 3.0, 4.0, 1.0], dtype=torch.float64)),
    )
    return image, inner


def _cv(values: np.ndarray) -> float:
    return float(values.std() / values.mean())


def test_n4_flattens_a_tissue_that_a_field_made_uneven() -> None:
    image, inner = _phantom(field_strength=0.35)
    before = _cv(image[0].numpy()[inner])
    corrected = n4_correct(image)
    after = _cv(corrected[0].numpy()[inner])
    assert before > 0.08  # the field spreads one tissue's intensities (0.088)
    assert after < 0.25 * before  # N4: 0.011
    assert corrected.shape == image.shape and corrected.dtype == torch.float32
    assert torch.equal(corrected.affine, image.affine)
    # the two tissues keep their order and contrast (the field is divided out, no more)
    shell = ~inner & (image[0].numpy() > 0.3)
    ratio = corrected[0].numpy()[shell].mean() / corrected[0].numpy()[inner].mean()
    assert ratio == pytest.approx(0.6, abs=0.03)


def test_a_scan_n4_cannot_fit_gets_a_clear_error() -> None:
    single_slice = MetaTensor(torch.rand(1, 64, 64, 1, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(
        MedfedError,
        match=r"N4 bias-field correction failed on a scan of "
        r"\(64, 64, 1\) voxels",
    ) as info:
        n4_correct(single_slice)
    assert "bias_correction = 'off'" in str(info.value.fix)


def test_bias_correction_is_a_checked_site_data_option() -> None:
    assert DataSourceConfig().bias_correction == "off"
    with pytest.raises(pydantic.ValidationError, match="'off' or 'n4'"):
        DataSourceConfig(bias_correction="n3")


@pytest.mark.slow
def test_a_site_with_n4_trains_on_corrected_slices() -> None:
    task = get_task("brain-tissue-seg")
    plain = task.load_site_data(DataSourceConfig(num_samples=16, seed=1, profile=1))
    corrected = task.load_site_data(
        DataSourceConfig(num_samples=16, seed=1, profile=1, bias_correction="n4")
    )
    x0, y0 = plain.train.tensors
    x1, y1 = corrected.train.tensors
    assert torch.equal(y0, y1) and x0.shape == x1.shape  # same slices and labels
    assert not torch.allclose(x0, x1, atol=1e-3)  # other intensities
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0  # then scaled as usual
