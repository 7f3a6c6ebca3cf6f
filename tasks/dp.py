"""Differential privacy for any task: DP-SGD with Opacus, update-level DP, and epsilon.

Sample-level DP (DP-SGD, Abadi et al. 2016) is Opacus end to end: Poisson
sampling (``DPDataLoader``), per-sample gradients and clipping (``GradSampleModule``
+ ``DPOptimizer``), Gaussian noise, and Opacus's accountants (RDP or PRV) for
epsilon. Nothing here re-derives privacy math; :func:`epsilon_for` and friends
only feed an accountant a history ``[(noise_multiplier, sample_rate, steps), ...]``.

Randomness. The Poisson sampling and the noise must be unpredictable to the
coordinator: a seed it knows (run seed, round, site name) would let it recompute
and subtract the noise. :func:`dp_train` and :func:`clip_and_noise_update`
therefore take a generator; seeded generators are for tests and benchmarks only.
A site passes none: its noise and its Poisson sampling then come from
:class:`~medfed.tasks.dp_noise.SecureRandom` (ChaCha20 keyed from the OS, Gaussians
formed in float64; why in its module). Update-level DP draws its noise there as well.

Per-sample gradient modes measured on CPU (2 threads, batch 16, Adam, median step
time; DP over plain, same model, batch and optimizer; ``benchmarks/dp_overhead.py``):

- ``"rules"`` (:mod:`medfed.tasks.dp_rules`): one ordinary backward for the
  activation gradients only (parameters frozen during it), then a closed-form rule
  per layer; convolutions get the fastest of several exact weight-gradient methods,
  timed on the first batch per layer shape. Opacus in ``no_op`` mode clips, noises
  and accounts (its optimizer batched: :mod:`medfed.tasks.dp_optimizer`). DP/plain
  over three runs on a 2-core VM: brain-tissue-seg 1.24-1.25, tiny-seg 1.24-1.25,
  brain-tissue-seg-wide 1.32-1.34, brain-lesion-cls 1.27-1.36. With the noise a site
  draws (:mod:`medfed.tasks.dp_noise`, ChaCha20 and float64 Box-Muller instead of
  torch's float32 draw), two runs: 1.27-1.31, 1.28-1.30, 1.35-1.36, 1.29-1.32; later,
  with the VM's plain steps 20-30% slower, up to 1.31, 1.31, 1.39 and 1.42 (torch's
  draw in that state: 1.27, 1.29, 1.46, 1.35).
- ``"vmap"`` (:mod:`medfed.tasks.dp_vmap`): one ``torch.func.vmap(grad)`` over the
  whole model, Opacus in ``no_op`` mode: brain-tissue-seg 1.45-1.48, tiny-seg
  1.60-1.69, brain-tissue-seg-wide 1.49-1.59, brain-lesion-cls 2.34-2.42. Its
  batched convolution backward is what costs: on the lesion DenseNet 73 ms a step,
  against 22 ms for the plain step's convolution backward.
- :func:`choose_grad_sample_mode` times both on the first batch (medians of five
  interleaved calls) and keeps the rules unless vmap is 10% faster (per task and
  process), after checking the rules' gradients equal vmap's.
- ``grad_sample_mode="hooks"`` (Opacus default), the fallback without a loss to
  probe: brain-tissue-seg 1.86x. Per step about 6 ms go to Opacus's Python hooks,
  7 ms to ``unfold`` copies and 6 ms to the per-sample ``bmm`` (torch profiler);
  its backward also computes the batch's weight gradients, which DP discards.
- ``"functorch"`` (Opacus's per-layer vmap), the fallback for 3D convolutions:
  ``unfold3d`` copies each input k^3 times, so hooks were 3.3x against 1.6x then.
- ``"ew"`` (PyTorch expanded weights) fails on MONAI's ``PReLU`` ("Expanded
  Weights encountered but cannot handle function prelu") and on the DenseNet.
- ``"ghost"`` (fast gradient clipping) needs the loss wrapped by Opacus and
  two backward passes; on CPU it is slower for conv nets (the issue's anchor).
- Opacus has no per-sample rule for ``nn.PReLU`` (MONAI's default activation) nor
  for ``nn.ConvTranspose2d`` (the UNet's up path), so hooks mode falls back to
  functorch for each of them (the PReLU fallback alone made tiny-seg 7.5x plain).
  :mod:`medfed.tasks.dp_samplers` adds closed-form rules for both (hooks mode on
  the UNet: 2.04x -> 1.80x), checked against functorch in the tests.
- In-place activations (MONAI's DenseNet uses ``ReLU(inplace=True)``) break
  Opacus's backward hooks ("Output 0 of BackwardHookFunction is a view and is
  being modified inplace"); :func:`disable_inplace` switches them off (same math).
- ``BatchMemoryManager`` only splits a large logical batch into physical ones;
  at batch 16 it adds overhead and saves nothing on CPU. ``channels_last`` and
  ``torch.compile`` do not help the unfold path (compile breaks on the hooks).
- Opacus's optimizer step works per parameter tensor (a norm, a weighted sum, a
  zero tensor and a noise draw): about 4 ms a step on the lesion DenseNet's 73
  small tensors. :mod:`medfed.tasks.dp_optimizer` runs the same formulas over all
  parameters at once (Opacus's ``DPOptimizer`` subclassed, its noise function):
  about 1 ms for the same work, and it reads the per-sample gradients in the layout the rules
  write them (no copy of the wide UNet's 19 MB deepest-layer gradients).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from medfed.core.errors import MedfedError
from medfed.tasks import dp_rules, dp_samplers, dp_vmap
from medfed.tasks.base import Task

if TYPE_CHECKING:  # imported where DP-SGD runs: Opacus costs a plain site ~1 s of start-up
    from medfed.tasks.dp_noise import SecureRandom

AccountantName = Literal["rdp", "prv"]
#: One accountant history entry, as Opacus keeps it: (noise_multiplier, sample_rate, steps).
HistoryEntry = tuple[float, float, int]

#: Per-sample gradient modes medfed runs: ``"rules"`` (:mod:`medfed.tasks.dp_rules`) and
#: ``"vmap"`` (:mod:`medfed.tasks.dp_vmap`), both with Opacus in ``no_op`` mode, and two of
#: Opacus's own (``"ew"`` and ``"ghost"`` fail or lose here).
GRAD_SAMPLE_MODES = ("rules", "vmap", "hooks", "functorch")
#: Per-sample gradient functions of the modes that bypass Opacus's hooks.
_PER_SAMPLE = {"rules": dp_rules.per_sample_grads, "vmap": dp_vmap.per_sample_grads}
#: DP-SGD per scan or patient: at most this many examples' per-example gradients at
#: once (a draw of a few 2D scans holds hundreds of slices).
PHYSICAL_BATCH = 64


class LossNotPerSample(MedfedError):
    """The task's loss couples the samples of a batch: DP-SGD's clipping would not bound them."""


def _loss_is_mean_of_samples(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
                             y: torch.Tensor) -> bool:
    """Whether the batch loss equals the mean of each sample's own loss (model in eval mode)."""
    was_training = model.training
    model.eval()  # no dropout draws: the same function of each sample both times
    try:
        with torch.no_grad():
            batch = loss_fn(model(x), y)
            alone = torch.stack([loss_fn(model(x[i:i + 1]), y[i:i + 1]) for i in range(len(x))])
    finally:
        model.train(was_training)
    return bool(torch.allclose(batch, alone.mean(), rtol=1e-4, atol=1e-6))


#: Interleaved timed calls per mode, and how much faster vmap must be to be chosen.
#: From two calls each, brain-tissue-seg-wide got vmap in some processes although it is
#: the slower mode there (DP/plain 1.51 against 1.32-1.34 with the rules).
_TIMED_CALLS = 5
_VMAP_MARGIN = 0.10


def _faster_mode(modes: list[str], model: nn.Module, loss_fn: nn.Module,
                 x: torch.Tensor, y: torch.Tensor) -> str:
    """``"rules"`` unless vmap's median time beats it by :data:`_VMAP_MARGIN`.

    Calls alternate between the modes, so a slow spell of a shared machine (another
    site, the OS) lands on both; the margin keeps timing noise from flipping it.
    """
    calls = {m: functools.partial(_PER_SAMPLE[m], model, loss_fn, x, y) for m in modes}
    for call in calls.values():
        call()  # warm-up: kernels prepared, caches filled
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(_TIMED_CALLS):
        for m, call in calls.items():
            times[m].append(dp_rules.wall_time(call, x.device))
    median = {m: float(np.median(t)) for m, t in times.items()}
    if median["vmap"] < (1.0 - _VMAP_MARGIN) * median["rules"]:
        return "vmap"
    return "rules"


def _rules_agree(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 against_vmap: bool) -> bool:
    """Whether the layer rules run on this batch and, if asked, give vmap's gradients."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        if against_vmap:
            dp_vmap.per_sample_grads(model, loss_fn, x, y)
            reference = [p.grad_sample for p in trainable]
        dp_rules.per_sample_grads(model, loss_fn, x, y)
        return not against_vmap or all(
            torch.allclose(p.grad_sample, r, rtol=1e-3, atol=1e-6 * float(r.abs().max()) + 1e-9)
            for p, r in zip(trainable, reference, strict=True))
    except Exception:  # a layer the rules cannot follow (e.g. tuple outputs): not this mode
        return False
    finally:
        for p in model.parameters():
            p.grad_sample = None


def _opacus_mode(model: nn.Module) -> str:
    """Opacus's own mode: functorch for 3D convolutions (unfold3d copies inputs k^3 times)."""
    return "functorch" if any(isinstance(m, nn.Conv3d) for m in model.modules()) else "hooks"


def choose_grad_sample_mode(
    model: nn.Module, loss_fn: nn.Module | None = None,
    sample: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> str:
    """The fastest correct per-sample gradient mode for ``model`` and ``loss_fn``, measured.

    With ``loss_fn`` and ``sample`` (a batch of the expected size): ``"vmap"`` when
    ``torch.func`` can trace model and loss, ``"rules"`` when every layer with
    parameters has a rule and its gradients equal vmap's on ``sample`` (or, where vmap
    cannot trace, the batch loss is the mean of the samples' own losses, which the
    rules assume); when both qualify, the rules unless vmap is clearly faster on
    ``sample`` (:func:`_faster_mode`: medians of five interleaved calls, 10% margin).
    A loss that couples the samples of a batch is refused (:class:`LossNotPerSample`):
    per-sample clipping would not bound any sample's influence. Without a sample:
    ``"functorch"`` for 3D convolutions (Opacus's unfold3d copies each input k^3 times)
    and ``"hooks"`` otherwise, Opacus's own.
    """
    if loss_fn is None or sample is None:
        return _opacus_mode(model)
    x, y = sample
    vmap_ok = dp_vmap.supported(model, loss_fn, x, y)
    if not vmap_ok and not _loss_is_mean_of_samples(model, loss_fn, x, y):
        raise LossNotPerSample(
            "The task's loss is not the mean of each sample's own loss: a sample's "
            "gradient depends on the other samples of the batch, so DP-SGD's per-sample "
            "clipping would not bound its influence.",
            where=f"the task's build_loss ({type(loss_fn).__name__})",
            expected="a loss averaged over per-sample terms (e.g. MONAI Dice with batch=False)",
            fix="compute the loss per sample and average it (no batch-wide Dice or statistics)",
        )
    rules_ok = not dp_rules.unsupported(model) and _rules_agree(model, loss_fn, x, y, vmap_ok)
    candidates = [m for m, ok in (("rules", rules_ok), ("vmap", vmap_ok)) if ok]
    if not candidates:
        return _opacus_mode(model)
    if len(candidates) == 1:
        return candidates[0]
    chosen = _faster_mode(candidates, model, loss_fn, x, y)
    for p in model.parameters():
        p.grad_sample = None
    return chosen


#: The mode :func:`dp_train` chose for each task (a task fixes its model and loss).
_MODE_BY_TASK: dict[str, str] = {}


def first_samples(dataset: Dataset[Any], n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of ``dataset`` as a batch (the vmap probe's input)."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]  # type: ignore[arg-type]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


class DPIncompatibleModel(MedfedError):
    """The task's model cannot be trained with DP-SGD as built."""


# ------------------------------------------------------------------ validation


def _inplace_modules(model: nn.Module) -> list[str]:
    return [name or "(model)" for name, m in model.named_modules() if getattr(m, "inplace", False)]


def validate_for_dp(model: nn.Module) -> list[str]:
    """Check ``model`` for DP-SGD with Opacus before any round; return notes, raise on errors.

    Returns
    -------
    list[str]
        Notes on what :func:`make_private` changes without altering the math
        (in-place activations switched off). Empty when nothing needs changing.

    Raises
    ------
    DPIncompatibleModel
        Opacus's ``ModuleValidator`` found modules DP-SGD cannot train (BatchNorm
        mixes samples, so per-sample gradients do not exist). The message names
        each module, Opacus's reason and the fix: build the model with GroupNorm
        or InstanceNorm in the task (what ``ModuleValidator.fix`` does). medfed does
        not apply the fix at the site, because it changes the weights' layout the
        server and the other sites share.
    """
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # Opacus validates the training configuration
    try:
        errors = ModuleValidator.validate(model, strict=False)
        lines = []
        if errors:  # Opacus's errors do not say where: ask each module's validator
            for name, sub in trainable_modules(model):
                check = ModuleValidator.VALIDATORS.get(type(sub))
                for err in check(sub) if check else []:
                    reason = str(err).split(". ")[0].strip()
                    lines.append(f"{name or '(model)'} ({type(sub).__name__}): {reason}")
            lines = lines or [str(e).split(". ")[0] for e in errors]
    finally:
        model.train(was_training)
    if errors:
        raise DPIncompatibleModel(
            f"The model cannot be trained with DP-SGD: {len(lines)} incompatible module(s): "
            + "; ".join(lines) + ".",
            where=f"{type(model).__name__}",
            expected="no BatchNorm or other layers that mix samples of a batch",
            fix="build the model with GroupNorm or InstanceNorm in the task's build_model "
            "(opacus.validators.ModuleValidator.fix(model) replaces BatchNorm with GroupNorm), "
            "then restart the federation from fresh weights",
        )
    return [
        f"{name}: in-place operation, switched off for DP-SGD (Opacus hooks need it; same math)"
        for name in _inplace_modules(model)
    ]


def disable_inplace(model: nn.Module) -> list[str]:
    """Set ``inplace = False`` on every module that has it; return their names."""
    changed = _inplace_modules(model)
    for m in model.modules():
        if getattr(m, "inplace", False):
            m.inplace = False  # type: ignore[assignment]
    return changed


# ------------------------------------------------------------------ DP-SGD


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

    def step(self, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
             units: torch.Tensor | None = None,
             proximal: tuple[float, list[torch.Tensor]] | None = None) -> float:
        """One DP-SGD step on the batch ``(x, y)``; returns its mean loss.

        ``proximal`` ``(mu, anchors)``: FedProx's term ``mu/2 ||w - anchor||^2``, one
        anchor per ``optimizer.params``. Its gradient ``mu (w - anchor)`` is added after
        clipping and noising: it depends on no example (the weights are earlier DP
        outputs, the anchor is the global model), so it costs no privacy, and kept out
        of the per-sample gradients it is neither clipped nor mistaken for data.

        ``units`` (``privacy.unit`` "scan" or "patient"): for each example, the index
        (0..k-1) of the privacy unit it belongs to in this batch. The optimizer then
        clips and sums one gradient per unit: the mean of its examples' gradients (the
        gradient of the unit's mean loss), so a whole unit moves the sum by at most the
        clipping norm. A draw of scans or patients holds many examples, so in the rules
        and vmap modes their per-example gradients are computed ``PHYSICAL_BATCH`` at a
        time and summed per unit as they come.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if units is not None and self.mode in _PER_SAMPLE:
            loss = self._per_unit_in_chunks(loss_fn, x, y, units)
        elif self.mode in _PER_SAMPLE:
            loss = _PER_SAMPLE[self.mode](self.model._module, loss_fn, x, y)
        else:
            loss = loss_fn(self.model(x), y)
            with warnings.catch_warnings():  # the input needs no grad: expected here
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
        if units is not None and self.mode not in _PER_SAMPLE:
            _grad_per_unit(self.optimizer.params, units)
        if proximal is None:
            self.optimizer.step()  # Opacus: clip each sample (or unit), sum, add noise, account
        elif self.optimizer.pre_step():  # the same, up to p.grad (False: a skipped step)
            mu, anchors = proximal
            with torch.no_grad():
                for p, anchor in zip(self.optimizer.params, anchors, strict=True):
                    p.grad.add_(p.detach() - anchor, alpha=mu)
            self.optimizer.original_optimizer.step()
        return float(loss.detach())

    def _per_unit_in_chunks(self, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            units: torch.Tensor) -> torch.Tensor:
        """Set each ``p.grad_sample`` to one row per unit (the mean), a chunk at a time."""
        params = self.optimizer.params
        units = units.to(x.device)
        k = int(units.max()) + 1
        sums: list[torch.Tensor] = []
        loss = x.new_zeros(())
        for start in range(0, len(x), PHYSICAL_BATCH):
            part = slice(start, start + PHYSICAL_BATCH)
            mean = _PER_SAMPLE[self.mode](self.model._module, loss_fn, x[part], y[part])
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


def _add_per_unit(params: Sequence[nn.Parameter], units: torch.Tensor, k: int,
                  sums: list[torch.Tensor]) -> None:
    """Add each ``p.grad_sample`` row to its unit's row of ``sums`` (created on first use)."""
    for i, p in enumerate(params):
        g = p.grad_sample
        if not isinstance(g, torch.Tensor):  # accumulated lists: not a path dp_train takes
            raise RuntimeError("per-unit gradients need one per-sample gradient tensor")
        if i == len(sums):
            sums.append(g.new_zeros((k, *g.shape[1:])))
        sums[i].index_add_(0, units, g)
        p.grad_sample = None


def _set_unit_means(params: Sequence[nn.Parameter], sums: list[torch.Tensor],
                    units: torch.Tensor) -> None:
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
            module=model, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=poisson_sampling,
            grad_sample_mode="no_op" if mode in _PER_SAMPLE else mode,
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
                fix="train with flat per-sample clipping; the round is refused")
        private_opt.noise_source = randomness
        if poisson_sampling:
            sample_securely(private_loader, randomness)
    return PrivateTraining(engine, private_model, private_opt, private_loader, mode)


def plan_round(
    num_examples: int, *, batch_size: int, epochs: int, noise_multiplier: float
) -> list[HistoryEntry]:
    """The accountant history one :func:`dp_train` call will produce, known before training.

    Opacus's Poisson loader samples at ``q = 1 / len(DataLoader)`` for
    ``len(DataLoader) = ceil(n / batch_size)`` steps per epoch.
    """
    if num_examples <= 0:
        raise ValueError("cannot train with DP on an empty dataset")
    steps_per_epoch = math.ceil(num_examples / batch_size)
    return [(float(noise_multiplier), 1.0 / steps_per_epoch, steps_per_epoch * epochs)]


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
    """
    from medfed.tasks.dp_noise import SecureRandom

    n = len(dataset)  # type: ignore[arg-type]
    randomness = SecureRandom() if generator is None else None
    model.to(device).train()
    loss_fn = task.build_loss()
    if optimizer == "sgd":
        base: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=learning_rate, momentum=0.9,
            weight_decay=task.defaults.weight_decay)
    else:
        base = torch.optim.Adam(
            model.parameters(), lr=learning_rate, weight_decay=task.defaults.weight_decay)
    averaged = [(p, p.detach().clone()) for p in model.parameters()] if average_iterates else []
    members = _unit_members(units, n) if units is not None else None
    # Poisson sampling draws units: examples, or the indices of scans or patients
    drawn_from: Dataset[Any] = dataset if members is None else TensorDataset(
        torch.arange(len(members)))
    loader = DataLoader(drawn_from, batch_size=batch_size, shuffle=True, generator=generator)
    private = make_private(
        model, base, loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, accountant=accountant, noise_generator=generator,
        randomness=randomness,
        grad_sample_mode=grad_sample_mode or _MODE_BY_TASK.get(task.name), loss_fn=loss_fn,
        examples=dataset,
    )
    if grad_sample_mode is None:  # probe vmap once per task, not every round
        _MODE_BY_TASK.setdefault(task.name, private.mode)
    proximal = ((proximal_mu, [p.detach().clone() for p in private.optimizer.params])
                if proximal_mu > 0 else None)
    sample_rate = 1.0 / len(private.data_loader)
    total, seen, empty = 0.0, 0, 0
    try:
        for _ in range(epochs):
            for batch in private.data_loader:
                x, y, owner = (*batch, None) if members is None else _unit_batch(
                    dataset, members, batch[0])
                if len(x) == 0:
                    private.engine.accountant.step(
                        noise_multiplier=noise_multiplier, sample_rate=sample_rate
                    )
                    empty += 1
                    continue
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = private.step(loss_fn, x, y, owner, proximal)
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
        loss=total / max(seen, 1), num_examples=n, steps=sum(h[2] for h in history),
        sample_rate=sample_rate, noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm), history=history, empty_batches=empty,
    )


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
                "(for 'patient': PatientID in every series)")
    return int(torch.unique(units[unit]).numel())


def _unit_members(units: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The example indices of each unit, in unit order."""
    if units.shape != (n,):
        raise MedfedError(
            f"The task gave {tuple(units.shape)} unit indices for {n} training examples.",
            where="SiteData.train_units", expected="one unit index per training example",
            fix="return train_units with one integer per example from load_site_data")
    _, inverse = torch.unique(units, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    return list(torch.split(order, torch.bincount(inverse).tolist()))


def _unit_batch(dataset: Dataset[Any], members: list[torch.Tensor], drawn: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The examples of the drawn units, and for each example its unit's place in the draw."""
    parts = [members[i] for i in drawn.tolist()]
    if not parts:
        x, y = first_samples(dataset, 1)
        return x[:0], y[:0], torch.zeros(0, dtype=torch.long)
    index = torch.cat(parts)
    owner = torch.repeat_interleave(torch.arange(len(parts)),
                                    torch.tensor([len(m) for m in parts]))
    if isinstance(dataset, TensorDataset):
        x, y = (t[index] for t in dataset.tensors)
    else:
        x, y = default_collate([dataset[i] for i in index.tolist()])
    return x, y, owner


# ------------------------------------------------------------------ accounting


def _accountant(name: AccountantName) -> Any:
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return PRVAccountant()
    raise MedfedError(
        f"Unknown privacy accountant {name!r}.", expected="'rdp' or 'prv'",
        fix="set privacy.accountant = 'rdp' (or 'prv') in the run configuration",
    )


def epsilon_of_history(
    history: Sequence[HistoryEntry], delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon of a whole accountant history at ``delta`` (Opacus's accountant); 0 if empty.

    Consecutive entries of the same noise and sampling rate are merged first, as
    Opacus's accountants merge them on ``step()``: a run's rounds then give the
    history one long training would, and PRV discretizes one entry, not one per round.
    """
    entries: list[HistoryEntry] = []
    for z, q, s in history:
        if int(s) <= 0:
            continue
        if entries and entries[-1][:2] == (float(z), float(q)):
            entries[-1] = (float(z), float(q), entries[-1][2] + int(s))
        else:
            entries.append((float(z), float(q), int(s)))
    if not entries:
        return 0.0
    acc = _accountant(accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


def epsilon_for(
    steps: int, sample_rate: float, noise_multiplier: float, delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps at ``delta``."""
    return epsilon_of_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def noise_for_target(
    target_epsilon: float, delta: float, *, sample_rate: float, steps: int,
    accountant: AccountantName = "rdp",
) -> float:
    """The smallest noise multiplier within ``(target_epsilon, delta)`` after ``steps``.

    The steps are Poisson-subsampled Gaussian steps at ``sample_rate``; Opacus's
    ``get_noise_multiplier`` searches. Its binary search returns the upper end of its
    bracket, so the result's epsilon is at most the target (within 0.01 below it).
    """
    return _noise_for_target(float(target_epsilon), float(delta), float(sample_rate),
                             int(steps), accountant)


@functools.lru_cache(maxsize=64)
def _noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: AccountantName) -> float:
    # Cached: a site asks the same question every round of a run (PRV takes seconds).
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=accountant))
    except ValueError as exc:  # "The privacy budget is too low."
        raise ValueError(
            f"no noise multiplier up to 1e6 keeps {steps} steps at sampling rate "
            f"{sample_rate:g} within epsilon {target_epsilon:g} (delta {delta:g}): {exc} "
            "Ask for a larger target_epsilon, fewer rounds or local epochs, or a larger batch."
        ) from None


def epsilon_of_round(
    history_so_far: Sequence[HistoryEntry], round_history: Sequence[HistoryEntry],
    delta: float, accountant: AccountantName = "rdp",
) -> float:
    """Epsilon one more round adds to a run: eps(history + round) - eps(history).

    The accountant composes the run's whole history (tighter than summing
    per-round epsilons); the increments of a run's rounds add up to its epsilon,
    so a ledger can sum them. Call it before training with :func:`plan_round`.
    """
    before = epsilon_of_history(history_so_far, delta, accountant)
    after = epsilon_of_history([*history_so_far, *round_history], delta, accountant)
    return max(after - before, 0.0)


# ------------------------------------------------------------------ update-level DP


def clip_and_noise_update(
    delta_vector: np.ndarray, *, clipping_norm: float, noise_multiplier: float,
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """L2-clip a site's update to ``clipping_norm`` and add Gaussian noise (a new array).

    The noise is ``N(0, (noise_multiplier * clipping_norm)^2)`` per coordinate.
    This is the client-side part of Flower's ``DifferentialPrivacyClientSideFixedClipping``
    (McMahan et al. 2018, "Learning differentially private recurrent language
    models"), with the noise added at the site instead of the server, so it still
    holds once updates are encrypted: with secure aggregation the server only ever
    sees the noised, masked sum. A site passes no ``generator``: the noise then comes
    from :class:`~medfed.tasks.dp_noise.SecureRandom`; a seeded one is for tests.
    Fails closed on a non-finite update.
    """
    from medfed.tasks.dp_noise import SecureRandom

    if clipping_norm <= 0 or noise_multiplier < 0:
        raise ValueError(
            f"need clipping_norm > 0 and noise_multiplier >= 0, got {clipping_norm}, "
            f"{noise_multiplier}"
        )
    vec = np.asarray(delta_vector, dtype=np.float64)
    if not np.all(np.isfinite(vec)):
        raise MedfedError(
            "The update holds NaN or infinite values; it is not sent.",
            fix="check the local training (learning rate, data); the round is refused",
        )
    norm = float(np.linalg.norm(vec))
    clipped = vec * min(1.0, clipping_norm / norm) if norm > 0 else vec.copy()
    std = noise_multiplier * clipping_norm
    noise = (generator.normal(0.0, std, size=vec.shape) if generator is not None
             else SecureRandom().normal(std, torch.empty(vec.shape, dtype=torch.float64))
             .numpy())
    noised = clipped + noise
    out_dtype = delta_vector.dtype if np.issubdtype(delta_vector.dtype, np.floating) else np.float64
    return noised.astype(out_dtype)


def epsilon_for_update_dp(
    rounds: int, sampling_fraction: float, noise_multiplier: float, delta: float
) -> float:
    """User-level epsilon of a site's whole dataset after ``rounds`` noised updates.

    Each round is a Gaussian mechanism on the clipped update (sensitivity
    ``clipping_norm``, noise multiplier ``noise_multiplier``), subsampled with
    probability ``sampling_fraction``; Opacus's RDP accountant composes them.
    A site charging its own ledger should pass ``sampling_fraction = 1.0``: it
    cannot verify the server's sampling, and it knows when it takes part.
    """
    return epsilon_for(rounds, sampling_fraction, noise_multiplier, delta, "rdp")
