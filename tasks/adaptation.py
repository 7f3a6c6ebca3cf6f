"""Domain-adaptation hooks: which parameters of a task model each site keeps to itself.

Scanners differ (contrast, bias field, noise, resolution), and one shared model
pulled towards every site's intensities at once learns each of them worse. A hook
names the parameters that stay at the site: every site trains its own copy of them,
they are never sent (not even masked), and the server aggregates only the rest.
Each site then scores the shared model with its own local parameters.

A researcher adds a hook in one file: a :class:`DomainAdaptation` registered under
the ``medfed.adaptations`` entry point group (see docs/plugins.md). A run picks one
by name (``adaptation = "site-input-block"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from medfed.core.errors import MedfedError
from medfed.core.registry import Registry
from medfed.tasks.base import Task

#: Normalization layers whose affine parameters FedBN keeps local (no BatchNorm: DP).
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True, kw_only=True)
class DomainAdaptation:
    """A registered domain-adaptation hook.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"fedbn"``.
    description : str
        One line for ``medfed adaptations``.
    local_parameters : Callable[[Task, nn.Module], Iterable[str]]
        Given the task and a fresh model of it, the ``state_dict`` keys that stay
        at each site. Raise :class:`MedfedError` when the hook does not fit the model.
    """

    name: str
    description: str
    local_parameters: Callable[[Task, nn.Module], Iterable[str]]


def _none(task: Task, model: nn.Module) -> Iterable[str]:
    return ()


def _blocks(task: Task, model: nn.Module, which: str) -> list[str]:
    names: tuple[str, ...] = getattr(task, f"{which}_block")
    if not names:
        raise MedfedError(
            f"Task {task.name!r} declares no {which} block, so this adaptation has "
            "nothing to keep local there.",
            expected=f"Task.{which}_block naming the model's {which} block, e.g. ('model.0',)",
            fix=f"set {which}_block in the task, or pick another adaptation "
            "(`medfed adaptations` lists them)",
        )
    prefixes = tuple(f"{name}." for name in names)
    keys = [k for k in model.state_dict() if k.startswith(prefixes)]
    if not keys:
        raise MedfedError(
            f"Task {task.name!r} names {which} block {names}, but its model has no "
            "parameters under that name.",
            expected="module names of the task's model (see model.named_modules())",
            fix=f"correct Task.{which}_block",
        )
    return keys


def _input_block(task: Task, model: nn.Module) -> Iterable[str]:
    return _blocks(task, model, "input")


def _input_output(task: Task, model: nn.Module) -> Iterable[str]:
    return _blocks(task, model, "input") + _blocks(task, model, "output")


def _fedbn(task: Task, model: nn.Module) -> Iterable[str]:
    keys = [
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if isinstance(module, _NORMS)
        for p, _ in module.named_parameters(recurse=False)
    ]
    if not keys:
        raise MedfedError(
            f"The model of task {task.name!r} has no normalization parameters (its "
            "normalization layers are not affine), so 'fedbn' would keep nothing local.",
            fix="pick 'site-input-block' or 'none' (`medfed adaptations` lists them)",
        )
    return keys


ADAPTATIONS: Registry[DomainAdaptation] = Registry(
    "adaptation", plural="adaptations", entry_point_group="medfed.adaptations"
)

for _hook in (
    DomainAdaptation(
        name="none",
        description="every parameter is shared (plain federated training)",
        local_parameters=_none,
    ),
    DomainAdaptation(
        name="site-input-block",
        description="each site keeps its own first "
        "block (its scanner's contrast and intensity mapping); the rest is shared",
        local_parameters=_input_block,
    ),
    DomainAdaptation(
        name="site-input-output",
        description="each site keeps its own first "
        "block and prediction head; the body in between is shared (FedPer-style)",
        local_parameters=_input_output,
    ),
    DomainAdaptation(
        name="fedbn",
        description="each site keeps its normalization layers' "
        "scale and shift (FedBN, Li et al. 2021)",
        local_parameters=_fedbn,
    ),
):
    ADAPTATIONS.register(_hook.name, _hook)


def get_adaptation(name: str) -> DomainAdaptation:
    """Return the hook registered as ``name`` ('did you mean' on a typo)."""
    return ADAPTATIONS.get(name)


def local_keys(task: Task, model: nn.Module, adaptation: str) -> frozenset[str]:
    """The ``state_dict`` keys of ``model`` that stay at each site under ``adaptation``."""
    keys = frozenset(get_adaptation(adaptation).local_parameters(task, model))
    unknown = keys - set(model.state_dict())
    if unknown:
        raise MedfedError(
            f"Adaptation {adaptation!r} names parameters the model of task {task.name!r} "
            f"does not have: {sorted(unknown)[:3]}",
            fix="fix the adaptation hook's local_parameters",
        )
    return keys
