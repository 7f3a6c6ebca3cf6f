"""Latency fixes for Flower 1.42 internals that have no setting of their own.

Each patch replaces one module-level name in one Flower module, checks that the
name is what it expects, and otherwise leaves Flower as it is and says so (these
are speed-ups: skipping one never changes a result).
"""

from __future__ import annotations

import functools
import logging
import time as _time
from types import ModuleType, SimpleNamespace

log = logging.getLogger("medfed")


def capped_time(cap: float) -> SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never exceeds ``cap`` seconds."""
    ns = SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    ns.sleep = lambda seconds: _time.sleep(min(float(seconds), cap))
    return ns


def cap_module_sleeps(module: ModuleType, cap: float) -> bool:
    """Cap every ``time.sleep`` of ``module`` (which must ``import time``) at ``cap`` s."""
    if getattr(module, "time", None) is not _time:
        log.warning("%s no longer imports time; its polling is left at Flower's default",
                    module.__name__)
        return False
    module.time = capped_time(cap)  # type: ignore[attr-defined]
    return True


def shorten_object_pull_backoff(module: ModuleType, initial: float, cap: float) -> bool:
    """Make ``module.pull_objects`` retry a not-yet-uploaded object after ``initial`` s, not 1 s.

    A reply's metadata reaches the SuperLink before its arrays; Flower's puller then
    backs off a full second before it looks again.
    """
    from flwr.supercore.inflatable import inflatable_utils

    if getattr(module, "pull_objects", None) is not inflatable_utils.pull_objects:
        log.warning("%s.pull_objects changed; object pulls keep Flower's 1 s backoff",
                    module.__name__)
        return False
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        inflatable_utils.pull_objects, initial_backoff=initial, backoff_cap=cap
    )
    return True
