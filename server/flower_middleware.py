"""Let model bytes skip the SuperLink middleware layers that have nothing to do for them.

Flower 1.42's SuperLink wraps every HTTP request in eight ``BaseHTTPMiddleware``
layers. Each layer moves the request and response bodies through its own anyio
streams and task group, so a 5 MB object chunk pays for eight of them, while four of
the layers only ever act on Control API paths (``/v1/control/``), one only on Fleet
paths (node authentication), and the Fleet event log only with an event-log plugin
(the open-source SuperLink has none). Here each of those layers is replaced by a
subclass that hands a request it would only pass on straight to the next layer; a
request it acts on goes through it as before. Authentication is never skipped: a layer
is bypassed only where its own ``dispatch`` would call ``call_next`` and nothing else.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import HTTPConnection

log = logging.getLogger("flwr")  # the SuperLink's own log

CONTROL_PREFIX = "/v1/control/"
FLEET_PREFIX = "/v1/fleet/"


def _path(scope: dict[str, Any]) -> str:
    return HTTPConnection(scope).url.path  # what the layer's own dispatch reads


def _not_control(scope: dict[str, Any]) -> bool:
    return not _path(scope).startswith(CONTROL_PREFIX)


def _not_fleet(scope: dict[str, Any]) -> bool:
    return not _path(scope).startswith(FLEET_PREFIX)


def _no_fleet_event_log(scope: dict[str, Any]) -> bool:
    if _not_fleet(scope):
        return True
    return getattr(HTTPConnection(scope).app.state, "fleet_event_log_plugin", None) is None


#: Layer (module, class name) -> when the layer's dispatch only calls ``call_next``.
PASS_THROUGH: dict[tuple[str, str], Callable[[dict[str, Any]], bool]] = {
    ("flwr.superlink.routers.control.middlewares", "ControlSensitiveResponseMiddleware"): (
        _not_control
    ),
    ("flwr.superlink.routers.control.middlewares", "ControlAuthenticationMiddleware"): (
        _not_control
    ),
    ("flwr.superlink.routers.control.middlewares", "ControlLicenseMiddleware"): _not_control,
    ("flwr.superlink.routers.control.middlewares", "ControlEventLogMiddleware"): _not_control,
    ("flwr.superlink.routers.fleet.node_auth", "NodeAuthMiddleware"): _not_fleet,
    ("flwr.superlink.routers.fleet.middlewares", "FleetEventLogMiddleware"): _no_fleet_event_log,
}


def bypassing(layer: type, passes_through: Callable[[dict[str, Any]], bool]) -> type:
    """``layer`` that hands an HTTP request for which ``passes_through`` holds to the next app."""

    class Bypassing(layer):  # type: ignore[misc, valid-type]
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and passes_through(scope):
                await self.app(scope, receive, send)
                return
            await super().__call__(scope, receive, send)

    Bypassing.__name__ = Bypassing.__qualname__ = layer.__name__
    Bypassing.bypassed_layer = layer  # type: ignore[attr-defined]
    return Bypassing


def bypass_idle_middleware() -> int:
    """Install :func:`bypassing` layers in the SuperLink's app; returns how many were replaced.

    A layer whose class is not where this expects it stays as it is (with a warning):
    the SuperLink then works as stock Flower does, only slower.
    """
    app_module = importlib.import_module("flwr.superlink.main")
    replaced = 0
    for (module_name, name), passes_through in PASS_THROUGH.items():
        layer = getattr(importlib.import_module(module_name), name, None)
        current = getattr(app_module, name, None)
        if layer is not None and getattr(current, "bypassed_layer", None) is layer:
            replaced += 1  # installed already
            continue
        if layer is None or current is not layer:
            log.warning("medfed: Flower's %s changed; it stays in every request's path", name)
            continue
        setattr(app_module, name, bypassing(layer, passes_through))
        replaced += 1
    return replaced
