"""Whether a task's model can be trained with DP-SGD (Opacus's validators), said per module."""

from __future__ import annotations

from torch import nn

from medfed.core.errors import MedfedError


class DPIncompatibleModel(MedfedError):
    """The task's model cannot be trained with DP-SGD as built."""


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
            + "; ".join(lines)
            + ".",
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
