"""A site's DP noise and Poisson sampling come from ChaCha20 keyed by the OS, not torch's RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.tasks import dp, dp_noise, dp_optimizer, dp_update, get_task
from medfed.tasks.dp_noise import SecurePoissonSampler, SecureRandom, sample_securely
from tests.test_dp_optimizer import BATCH, _model, _optimizers, _pre_step


def test_secure_gaussian_has_the_asked_spread_shape_and_dtype() -> None:
    like = torch.empty(3, 150_001)  # odd: Box-Muller pairs and a lone last sample
    z = SecureRandom(key=bytes(range(32))).normal(0.7, like).double()
    assert z.shape == like.shape and SecureRandom().normal(1.0, like).dtype == torch.float32
    flat = z.flatten() / 0.7
    assert float(flat.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(flat.std()) == pytest.approx(1.0, rel=0.01)
    assert float(flat.pow(4).mean()) == pytest.approx(3.0, rel=0.03)  # Gaussian tails
    # a normal's quantiles, not only its moments
    assert float((flat.abs() < 1.0).double().mean()) == pytest.approx(0.6827, abs=0.005)
    assert float((flat.abs() > 3.0).double().mean()) == pytest.approx(0.0027, abs=0.0008)
    assert SecureRandom().normal(2.0, torch.empty(4, dtype=torch.float64)).dtype == torch.float64


def test_secure_gaussian_ignores_torch_seeds_and_instances_differ() -> None:
    """OS-keyed by design: independence is checked at 6 sigma."""
    like = torch.empty(10_000)
    torch.manual_seed(0)
    a = SecureRandom().normal(1.0, like)
    torch.manual_seed(0)
    b = SecureRandom().normal(1.0, like)
    source = SecureRandom()
    c, d = source.normal(1.0, like), source.normal(1.0, like)  # the stream moves on
    for x, y in ((a, b), (c, d)):
        assert abs(float(torch.corrcoef(torch.stack([x, y]))[0, 1])) < 0.06  # 6 sigma


def test_the_batched_and_per_tensor_paths_draw_from_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_torch_noise(**_: object) -> torch.Tensor:
        raise AssertionError("noise drawn from torch's generator")

    monkeypatch.setattr(dp_optimizer, "_generate_noise", no_torch_noise)
    model = _model()
    _, batched = _optimizers(model, noise=1.5, clip=0.4)
    batched.noise_source = SecureRandom()
    zeros = [torch.zeros((BATCH, *p.shape)) for p in model.parameters()]
    draw = torch.cat([g.flatten() for g in _pre_step(batched, model, zeros)]) * BATCH
    assert batched._flat_summed is not None  # the batched path
    assert float(draw.std()) == pytest.approx(1.5 * 0.4, rel=0.03)
    # accumulated per-sample gradients take Opacus's per-tensor path: the same source
    batched.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = [torch.zeros((BATCH // 2, *p.shape)) for _ in range(2)]
    assert batched.pre_step()
    assert batched._flat_summed is None
    draw = torch.cat([p.grad.flatten() for p in model.parameters()]) * BATCH
    assert float(draw.std()) == pytest.approx(1.5 * 0.4 / 2, rel=0.03)  # over 2 accumulations


def test_a_sites_dp_training_never_draws_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = SecureRandom.normal

    def counted(self: SecureRandom, std: float, like: torch.Tensor) -> torch.Tensor:
        calls.append(like.numel())
        return real(self, std, like)

    def no_torch_noise(**_: object) -> torch.Tensor:
        raise AssertionError("noise drawn from torch's generator")

    def no_torch_sampling(self: object) -> None:
        raise AssertionError("batches drawn with torch's generator")

    monkeypatch.setattr(SecureRandom, "normal", counted)
    monkeypatch.setattr(dp_optimizer, "_generate_noise", no_torch_noise)
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", no_torch_sampling)
    task = get_task("tiny-seg")
    data = task.load_site_data(_tiny_source())
    model = task.build_model()
    stats = dp.dp_train(
        task,
        model,
        data.train,
        epochs=1,
        batch_size=8,
        learning_rate=0.01,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        device=torch.device("cpu"),
    )
    params = sum(p.numel() for p in model.parameters())
    assert calls and set(calls) == {params}
    assert len(calls) == stats.steps - stats.empty_batches


def test_update_level_noise_without_a_generator_comes_from_the_source() -> None:
    zero = np.zeros(200_000, dtype=np.float32)
    noised = dp_update.clip_and_noise_update(zero, clipping_norm=0.5, noise_multiplier=2.0)
    assert noised.dtype == np.float32
    assert float(noised.std()) == pytest.approx(1.0, rel=0.02)
    again = dp_update.clip_and_noise_update(zero, clipping_norm=0.5, noise_multiplier=2.0)
    assert abs(float(np.corrcoef(noised, again)[0, 1])) < 0.02


def test_make_private_refuses_a_source_its_optimizer_cannot_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.zeros(16, 1, 5, 5), torch.zeros(16, dtype=torch.long)),
        batch_size=BATCH,
    )
    # make_private imports it when it runs: Opacus's own class comes back
    monkeypatch.setattr(dp_optimizer, "batch_optimizer_steps", lambda opt: opt)
    with pytest.raises(MedfedError, match="cryptographic generator"):
        dp.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
            randomness=SecureRandom(),
        )


def _tiny_source() -> DataSourceConfig:
    return DataSourceConfig(kind="synthetic", num_samples=32, seed=1)


def test_secure_poisson_sampling_keeps_each_index_with_the_rate() -> None:
    sampler = UniformWithReplacementSampler(num_samples=2000, sample_rate=0.05, steps=2000)
    loader = DataLoader(TensorDataset(torch.arange(2000)), batch_sampler=sampler)
    sample_securely(loader, SecureRandom(key=bytes(32)))
    assert type(loader.batch_sampler) is SecurePoissonSampler
    torch.manual_seed(0)
    batches = list(loader.batch_sampler)
    assert len(batches) == 2000
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(100.0, rel=0.03)  # q * n
    assert float(sizes.var()) == pytest.approx(2000 * 0.05 * 0.95, rel=0.2)  # binomial
    hits = torch.zeros(2000)
    for b in batches:
        hits[b] += 1
    assert int(hits.min()) > 40 and int(hits.max()) < 170  # each index ~ Binomial(2000, q)
    torch.manual_seed(0)
    assert list(loader.batch_sampler)[0] != batches[0]  # not replayed by torch's seed
    replay = UniformWithReplacementSampler(num_samples=2000, sample_rate=0.05, steps=2)
    sample_securely(
        DataLoader(TensorDataset(torch.arange(2000)), batch_sampler=replay),
        SecureRandom(key=bytes(32)),
    )
    assert list(replay) == batches[:2]  # the key alone fixes the stream


def test_a_loader_without_poisson_sampling_is_refused() -> None:
    plain = DataLoader(TensorDataset(torch.arange(10)), batch_size=2)
    with pytest.raises(MedfedError, match="cannot take its coin flips"):
        sample_securely(plain, SecureRandom())


def test_a_stream_starts_its_block_counter_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # An OS draw of all ones: with the counter taken from it (the old 16 random nonce
    # bytes), ChaCha20's 32-bit block counter overflowed on the second block.
    monkeypatch.setattr(dp_noise.os, "urandom", lambda n: b"\xff" * n)
    source = SecureRandom()
    drawn = torch.cat([source.uniform(1 << 18) for _ in range(3)])
    assert drawn.numel() == 3 << 18 and bool(((drawn > 0) & (drawn <= 1)).all())


def test_an_exhausted_stream_moves_to_a_fresh_nonce_not_a_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dp_noise, "_STREAM_BYTES", 8 * 300)  # 300 uniforms per stream
    key = bytes(range(32))
    source = SecureRandom(key=key)
    first, second, third = (source.uniform(200) for _ in range(3))
    values = torch.cat([first, second, third])
    assert values.unique().numel() == values.numel()  # no keystream reused
    again = SecureRandom(key=key)
    replayed = [again.uniform(200) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip((first, second, third), replayed, strict=True))


def test_the_accelerator_path_draws_the_same_gaussians_as_the_cpu_path() -> None:
    # _chunk_on is the path a CUDA gradient takes (Box-Muller on the device); run on
    # the CPU here, it must give the very values of the CPU path for the same stream.
    key = bytes(range(32))
    cpu, accelerated = SecureRandom(key=key), SecureRandom(key=key)
    for k in (5, 1 << 18, 3):
        assert torch.equal(cpu._chunk(k), accelerated._chunk_on(k, torch.device("cpu")))
