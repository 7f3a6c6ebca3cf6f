"""The site's own policy: decides, before any work, whether a run may use this site."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from medfed.core.config import PolicySection, RunConfig


@dataclass(frozen=True)
class Decision:
    """The policy's answer; ``rule`` names the site.toml key behind a refusal."""

    allowed: bool
    rule: str = ""
    reason: str = ""


def decide(policy: PolicySection, run: RunConfig) -> Decision:
    """Check the run's task and strategy against the site's allow-lists."""
    if not any(fnmatch.fnmatchcase(run.task, pat) for pat in policy.allowed_tasks):
        return Decision(
            False,
            "policy.allowed_tasks",
            f"task {run.task!r} is not in policy.allowed_tasks {policy.allowed_tasks}",
        )
    if not any(fnmatch.fnmatchcase(run.strategy, pat) for pat in policy.allowed_strategies):
        return Decision(
            False,
            "policy.allowed_strategies",
            f"strategy {run.strategy!r} is not in policy.allowed_strategies "
            f"{policy.allowed_strategies}",
        )
    return Decision(True)
