"""DP-SGD for any task, with Opacus: Poisson sampling, per-sample clipping, noise.

Sample-level DP (DP-SGD, Abadi et al. 2016) is Opacus end to end: Poisson
sampling (``DPDataLoader``), per-sample gradients and clipping (``GradSampleModule``
+ ``DPOptimizer``), Gaussian noise, and Opacus's accountants (RDP or PRV) for
epsilon (:mod:`medfed.core.privacy_accounting`). The per-sample gradient mode is
chosen in :mod:`medfed.tasks.dp_modes`, the model checked in
:mod:`medfed.tasks.dp_validation`, the privacy unit (example, scan, patient) drawn
through :mod:`medfed.tasks.dp_units`; update-level DP is :mod:`medfed.tasks.dp_update`.

Randomness. The Poisson sampling and the noise must be unpredictable to the
coordinator: a seed it knows (run seed, round, site name) would let it recompute
and subtract the noise. :func:`dp_train` and
:func:`~medfed.tasks.dp_update.clip_and_noise_update` therefore take a generator;
seeded generators are for tests and benchmarks only. A site passes none: its noise
and its Poisson sampling then come from :class:`~medfed.tasks.dp_noise.SecureRandom`
(ChaCha20 keyed from the OS, Gaussians formed in float64; why in its module).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medfed.core.errors import MedfedError
from medfed.core.privacy_accounting import AccountantName, HistoryEntry
from medfed.tasks import dp_samplers
from medfed.tasks.base import Task
from medfed.tasks.dp_modes import (
    GRAD_SAMPLE_MODES,
    PER_SAMPLE_GRADS,
    choose_grad_sample_mode,
    first_samples,
)
from medfed.tasks.dp_units import unit_batch, unit_members
from medfed.tasks.dp_validation import disable_inplace, validate_for_dp
from medfed.tasks.optimizers import adam

if TYPE_CHECKING:  # imported where DP-SGD runs: Opacus costs a plain site ~1 s of start-up
    from medfed.tasks.dp_noise import SecureRandom

#: DP-SGD per scan or patient: at most this many examples' per-example gradients at
#: once (a draw of a few 2D scans holds hundreds of slices).
PHYSICAL_BATCH = 64
#: The mode :func:`dp_train` chose for each task (a task fixes its model and loss).
_MODE_BY_TASK: dict[str, str] = {}


@dataclass(frozen=True)
class PrivateTraining:
    """What :func:`make_private` returns: Opacus's engine and its wrapped trio.

    ``engine.accountant.state_dict()`` / ``load_state_dict`` save and restore the
    accountant; ``model`` is a ``GradSampleModule`` around the caller's model (the
    same parameters); call :meth:`close` after training to remove Opacus's hooks.
    """

    engine: Any  # opacus.PrivacyEngine
    model: nn.Module
    optimizer: Any  # opacus.optimizers.DPOptimizer
    data_loader: DataLoader
    mode: str = "hooks"

    def step(
        self,
        loss_fn: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        units: torch.Tensor | None = None,
        proximal: tuple[float, list[torch.Tensor]] | None = None,
        correction: Sequence[torch.Tensor | None] | None = None,
    ) -> float:
        """One DP-SGD step on the batch ``(x, y)``; returns its mean loss.

        ``proximal`` ``(mu, anchors)``: FedProx's term ``mu/2 ||w - anchor||^2``, one
        anchor per ``optimizer.params``. Its gradient ``mu (w - anchor)`` is added after
        clipping and noising: it depends on no example (the weights are earlier DP
        outputs, the anchor is the global model), so it costs no privacy, and kept out
        of the per-sample gradients it is neither clipped nor mistaken for data.

        ``correction``: one constant (or None) per ``optimizer.params``, subtracted from
        the parameters after the step (SCAFFOLD's ``lr (c - c_i)``: the server's control
        variate and the site's own, both functions of earlier DP outputs only).

        ``units`` (``privacy.unit`` "scan" or "patient"): for each example, the index
        (0..k-1) of the privacy unit it belongs to in this batch. The optimizer then
        clips and sums one gradient per unit: the mean of its examples' gradients (the
        gradient of the unit's mean loss), so a whole unit moves the sum by at most the
        clipping norm. A draw of scans or patients holds many examples, so in the rules
        and vmap modes their per-example gradients are computed ``PHYSICAL_BATCH`` at a
        time and summed per unit as they come.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if units is not None and self.mode in PER_SAMPLE_GRADS:
            loss = self._per_unit_in_chunks(loss_fn, x, y, units)
        elif self.mode in PER_SAMPLE_GRADS:
            loss = PER_SAMPLE_GRADS[self.mode](self.model._module, loss_fn, x, y)
        else:
            loss = loss_fn(self.model(x), y)
            with warnings.catch_warnings():  # the input needs no grad: expected here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        if units is not None and self.mode not in PER_SAMPLE_GRADS:
            _grad_per_unit(self.optimizer.params, units)
        if proximal is None and correction is None:
            self.optimizer.step()  # Opacus: clip each sample (or unit), sum, add noise, account
        elif self.optimizer.pre_step():  # the same, up to p.grad (False: a skipped step)
            if proximal is not None:
                mu, anchors = proximal
                with torch.no_grad():
                    for p, anchor in zip(self.optimizer.params, anchors, strict=True):
                        p.grad.add_(p.detach() - anchor, alpha=mu)
            self.optimizer.original_optimizer.step()
            if correction is not None:
                with torch.no_grad():
                    for p, offset in zip(self.optimizer.params, correction, strict=True):
                        if offset is not None:
                            p.sub_(offset)
        return float(loss.detach())

    def _per_unit_in_chunks(
        self, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, units: torch.Tensor
    ) -> torch.Tensor:
        """Set each ``p.grad_sample`` to one row per unit (the mean), a chunk at a time."""
        params = self.optimizer.params
        units = units.to(x.device)
        k = int(units.max()) + 1
        sums: list[torch.Tensor] = []
        loss = x.new_zeros(())
        for start in range(0, len(x), PHYSICAL_BATCH):
            part = slice(start, start + PHYSICAL_BATCH)
            mean = PER_SAMPLE_GRADS[self.mode](self.model._module, loss_fn, x[part], y[part])
            loss = loss + mean * len(x[part])
            _add_per_unit(params, units[part], k, sums)
        _set_unit_means(params, sums, units)
        return loss / len(x)

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample gradients from the wrapped model."""
        close = getattr(self.model, "_close", None)
        if close is not None:
            close()


def _grad_per_unit(params: Sequence[nn.Parameter], units: torch.Tensor) -> None:
    """Replace each ``p.grad_sample`` (one row per example) by one row per unit: the mean.

    For Opacus's own modes (hooks, functorch), which see the whole draw at once.
    """
    units = units.to(params[0].device)
    sums: list[torch.Tensor] = []
    _add_per_unit(params, units, int(units.max()) + 1, sums)
    _set_unit_means(params, sums, units)


def _add_per_unit(
    params: Sequence[nn.Parameter], units: torch.Tensor, k: int, sums: list[torch.Tensor]
) -> None:
    """Add each ``p.grad_sample`` row to its unit's row of ``sums`` (created on first use)."""
    for i, p in enumerate(params):
        g = p.grad_sample
        if not isinstance(g, torch.Tensor):  # accumulated lists: not a path dp_train takes
            raise RuntimeError("per-unit gradients need one per-sample gradient tensor")
        if i == len(sums):
            sums.append(g.new_zeros((k, *g.shape[1:])))
        sums[i].index_add_(0, units, g)
        p.grad_sample = None


def _set_unit_means(
    params: Sequence[nn.Parameter], sums: list[torch.Tensor], units: torch.Tensor
) -> None:
    """Set each ``p.grad_sample`` to its per-unit sums divided by the units' sizes."""
    k = len(sums[0])
    counts = torch.bincount(units, minlength=k).to(sums[0].dtype)
    for p, summed in zip(params, sums, strict=True):
        p.grad_sample = summed / counts.view(k, *([1] * (summed.dim() - 1)))


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    grad_sample_mode: str | None = None,
    accountant: AccountantName = "rdp",
    accountant_state: dict[str, Any] | None = None,
    noise_generator: torch.Generator | None = None,
    randomness: SecureRandom | None = None,
    loss_fn: nn.Module | None = None,
    examples: Dataset[Any] | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD with ``opacus.PrivacyEngine``.

    The model is validated first (:func:`validate_for_dp`), its in-place
    activations are switched off, and Opacus gets per-sample rules for PReLU and
    transposed convolutions (:mod:`medfed.tasks.dp_samplers`).
    ``accountant_state`` (a previous ``engine.accountant.state_dict()``) restores
    the accountant's history. With ``randomness`` (what a site passes) the Poisson
    sampling and every noise draw come from it, and a loader or optimizer that cannot
    take it is refused; without, sampling draws from ``data_loader.generator`` and
    the noise from ``noise_generator``.
    ``grad_sample_mode=None`` picks :func:`choose_grad_sample_mode` (the modes that
    bypass Opacus's hooks are only probed when ``loss_fn`` is given, on ``examples``,
    by default the loader's dataset). Train with :meth:`PrivateTraining.step`.
    """
    from opacus import PrivacyEngine

    if grad_sample_mode is not None and grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise MedfedError(
            f"Opacus grad_sample_mode {grad_sample_mode!r} is not supported by medfed.",
            expected=f"one of {GRAD_SAMPLE_MODES}",
            fix="leave grad_sample_mode unset (medfed picks the fastest correct mode)",
        )
    validate_for_dp(model)
    disable_inplace(model)
    dp_samplers.register()
    mode = grad_sample_mode
    if mode is None:
        sample = None
        if loss_fn is not None:  # a batch of the expected size: the modes are timed on it
            device = next(model.parameters()).device
            probe = examples if examples is not None else data_loader.dataset
            # examples per step: the loader may draw units (scans) of several examples each
            per_step = (data_loader.batch_size or 2) * len(probe) / len(data_loader.dataset)
            x, y = first_samples(probe, min(max(round(per_step), 2), 32))
            sample = x.to(device), y.to(device)
        mode = choose_grad_sample_mode(model, loss_fn, sample)
    with warnings.catch_warnings():
        # Opacus warns about the non-secure RNG on every call; the module docstring says why.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=accountant)
        if accountant_state is not None:
            engine.accountant.load_state_dict(accountant_state)
        private_model, private_opt, private_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            grad_sample_mode="no_op" if mode in PER_SAMPLE_GRADS else mode,
            noise_generator=noise_generator,
        )
    from medfed.tasks.dp_noise import sample_securely
    from medfed.tasks.dp_optimizer import BatchedDPOptimizer, batch_optimizer_steps

    private_opt = batch_optimizer_steps(private_opt)  # the same math, fewer small ops
    if randomness is not None:  # fail closed: no weaker noise or sampling
        if not isinstance(private_opt, BatchedDPOptimizer):
            raise MedfedError(
                f"Opacus returned a {type(private_opt).__name__}, which cannot draw its noise "
                "from the site's cryptographic generator.",
                expected="Opacus's DPOptimizer (flat clipping)",
                fix="train with flat per-sample clipping; the round is refused",
            )
        private_opt.noise_source = randomness
        if poisson_sampling:
            sample_securely(private_loader, randomness)
    return PrivateTraining(engine, private_model, private_opt, private_loader, mode)


@dataclass(frozen=True)
class DPTrainStats:
    """What one :func:`dp_train` call reports (the fields of ``engine.TrainStats`` and more)."""

    loss: float
    num_examples: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    history: list[HistoryEntry]
    empty_batches: int


def _cycle(loader: DataLoader) -> Any:
    """The loader's batches, pass after pass (the caller stops it)."""
    while True:
        yield from loader


def dp_train(
    task: Task,
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    accountant: AccountantName = "rdp",
    grad_sample_mode: str | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
    average_iterates: float = 0.0,
    units: torch.Tensor | None = None,
    proximal_mu: float = 0.0,
    local_steps: int = 0,
    step_correction: Sequence[torch.Tensor | None] | None = None,
) -> DPTrainStats:
    """Train ``model`` in place with DP-SGD; FedProx's proximal term when ``proximal_mu`` > 0.

    ``optimizer``: ``"adam"`` (as ``engine.train``) or ``"sgd"`` (momentum 0.9), which
    measured better under DP noise on brain-tissue-seg at lr 0.1 (Adam normalizes each
    coordinate by its noisy second moment, amplifying noise where the signal is weak).
    ``average_iterates`` > 0 leaves the model at the exponential moving average of its
    iterates (that decay per step) instead of the last iterate: it averages out part
    of the noise, and as a function of DP outputs it costs no privacy.

    ``units`` (``privacy.unit`` "scan" or "patient"): the unit each example belongs to
    (``SiteData.train_units[unit]``). Poisson sampling then draws whole units,
    ``batch_size`` of them expected per step, and each unit's examples are clipped
    together (:meth:`PrivateTraining.step`): epsilon protects a scan or a patient,
    not a slice.

    ``generator`` drives Poisson sampling and the noise. ``None`` (what a site must
    use) samples and noises with a fresh :class:`~medfed.tasks.dp_noise.SecureRandom`;
    a seeded one is for tests only. The
    model leaves without Opacus hooks, so a cached model stays a plain module.
    An empty Poisson batch (possible on tiny datasets) skips the update but is
    still charged to the accountant (over-counting is the safe side).
    ``stats.history`` is this call's accountant history, equal to :func:`plan_round`.

    ``local_steps`` > 0 (SCAFFOLD's K): exactly that many Poisson draws (an empty one
    counts: it is charged), refused (MedfedError) when more than the ``epochs`` passes
    the round's budget was planned for, so the accountant never charges more than was
    reserved (fewer steps over-count: the safe side).
    ``step_correction``: one constant per trainable parameter, subtracted after each
    step, so after clipping and noise (:meth:`PrivateTraining.step`).
    """
    from medfed.tasks.dp_noise import SecureRandom

    n = len(dataset)  # type: ignore[arg-type]
    randomness = SecureRandom() if generator is None else None
    model.to(device).train()
    loss_fn = task.build_loss()
    if optimizer == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=learning_rate,
            momentum=0.9,
            weight_decay=task.defaults.weight_decay,
        )
    else:
        base = adam(model.parameters(), lr=learning_rate, weight_decay=task.defaults.weight_decay)
    averaged = [(p, p.detach().clone()) for p in model.parameters()] if average_iterates else []
    members = unit_members(units, n) if units is not None else None
    # Poisson sampling draws units: examples, or the indices of scans or patients
    drawn_from: Dataset[Any] = (
        dataset if members is None else TensorDataset(torch.arange(len(members)))
    )
    loader = DataLoader(drawn_from, batch_size=batch_size, shuffle=True, generator=generator)
    private = make_private(
        model,
        base,
        loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        noise_generator=generator,
        randomness=randomness,
        grad_sample_mode=grad_sample_mode or _MODE_BY_TASK.get(task.name),
        loss_fn=loss_fn,
        examples=dataset,
    )
    if grad_sample_mode is None:  # probe vmap once per task, not every round
        _MODE_BY_TASK.setdefault(task.name, private.mode)
    proximal = (
        (proximal_mu, [p.detach().clone() for p in private.optimizer.params])
        if proximal_mu > 0
        else None
    )
    sample_rate = 1.0 / len(private.data_loader)
    planned = epochs * len(private.data_loader)
    if local_steps > planned:
        private.close()
        raise MedfedError(
            f"The strategy asks for {local_steps} local steps, more than the {planned} "
            f"DP-SGD steps ({epochs} epoch(s) of {len(private.data_loader)}) this round's "
            "privacy budget is planned for.",
            where="strategy option local_steps (rule strategy.local_steps)",
            expected=f"local_steps <= {planned}",
            fix="lower the strategy's local_steps, or raise --local-epochs",
        )
    total, seen, empty = 0.0, 0, 0
    try:
        for _, batch in zip(
            range(local_steps or planned), _cycle(private.data_loader), strict=False
        ):
            x, y, owner = (
                (*batch, None) if members is None else unit_batch(dataset, members, batch[0])
            )
            if len(x) == 0:
                private.engine.accountant.step(
                    noise_multiplier=noise_multiplier, sample_rate=sample_rate
                )
                empty += 1
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = private.step(loss_fn, x, y, owner, proximal, step_correction)
            with torch.no_grad():
                for p, avg in averaged:
                    avg.lerp_(p.detach(), 1.0 - average_iterates)
            total += loss * len(x)
            seen += len(x)
    finally:
        private.close()
        for p in model.parameters():
            p.grad = None
    with torch.no_grad():
        for p, avg in averaged:
            p.copy_(avg)
    history = [(float(a), float(b), int(c)) for a, b, c in private.engine.accountant.history]
    return DPTrainStats(
        loss=total / max(seen, 1),
        num_examples=n,
        steps=sum(h[2] for h in history),
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        history=history,
        empty_batches=empty,
    )
