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

from medfed.core.idle_backoff import IdleBackoff

log = logging.getLogger("medfed")


def back_off_idle_polls(
    module: ModuleType, backoff: IdleBackoff, *, idle_sleep: float, activity: str
) -> bool:
    """Pace ``module``'s idle polls by ``backoff``; every other sleep is capped at its base.

    ``module`` sleeps ``idle_sleep`` seconds after a poll that found nothing (Flower's
    SuperNode: 3 s); the sleep takes ``backoff.interval()`` instead. ``module.<activity>``
    (a function it calls when it has work) marks activity on each call.
    """
    work = getattr(module, activity, None)
    if getattr(module, "time", None) is not _time or not callable(work):
        log.warning("%s changed; its polling is left at Flower's default", module.__name__)
        return False

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        _time.sleep(backoff.interval() if seconds == idle_sleep else min(seconds, backoff.base))

    @functools.wraps(work)
    def marked(*args: object, **kwargs: object) -> object:
        backoff.active()
        try:
            return work(*args, **kwargs)
        finally:
            backoff.active()

    ns = SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    ns.sleep = sleep
    module.time = ns  # type: ignore[attr-defined]
    setattr(module, activity, marked)
    return True


def shorten_object_pull_backoff(module: ModuleType, initial: float, cap: float) -> bool:
    """Make ``module.pull_objects`` retry a not-yet-uploaded object after ``initial`` s, not 1 s.

    A reply's metadata reaches the SuperLink before its arrays; Flower's puller then
    backs off a full second before it looks again.
    """
    from flwr.supercore.inflatable import inflatable_utils

    if getattr(module, "pull_objects", None) is not inflatable_utils.pull_objects:
        log.warning(
            "%s.pull_objects changed; object pulls keep Flower's 1 s backoff", module.__name__
        )
        return False
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        inflatable_utils.pull_objects, initial_backoff=initial, backoff_cap=cap
    )
    return True


#: The Flower modules of a SuperNode that read the heartbeat interval: the one that
#: declares it to the SuperLink and the one that paces the heartbeats.
HEARTBEAT_MODULES = ("flwr.supernode.fleet_http_connection", "flwr.supercore.heartbeat")


def set_heartbeat_interval(seconds: float) -> bool:
    """Make this process's SuperNode send and declare a heartbeat every ``seconds``.

    flower-supernode 1.42 has no option for it (a fixed 30 s); the SuperLink counts a
    node that missed two declared intervals as offline. If Flower changed, the site
    keeps the 30 s default, with a warning.
    """
    import importlib

    from flwr.common import constant

    modules = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    default = constant.HEARTBEAT_DEFAULT_INTERVAL
    if any(getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) != default for m in modules):
        log.warning(
            "Flower's heartbeat changed; this site keeps a %s s heartbeat, not %s s",
            default,
            seconds,
        )
        return False
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds  # type: ignore[attr-defined]
    return True
