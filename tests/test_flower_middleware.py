"""The SuperLink's idle middleware layers are bypassed only where they would do nothing.

server/flower_middleware.py: a layer hands a request straight on exactly when its own
``dispatch`` would only call the next layer; every other request still goes through it
(authentication included). The real SuperLink with these layers is exercised by every
end-to-end test (tests/test_e2e.py, tests/test_control_gate.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from flwr.supercore.error import FlowerError
from flwr.superlink.routers.control.middlewares import ControlAuthenticationMiddleware
from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware
from starlette.datastructures import State

from medfed.server import flower_middleware
from medfed.server.flower_middleware import PASS_THROUGH, bypass_idle_middleware, bypassing


class Inner:
    """The next ASGI app: records the paths it served and answers 200."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


class FakeApp:
    state = State()


def call(layer: Any, path: str, body: bytes = b"chunk") -> list[dict[str, Any]]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")],
        "scheme": "https",
        "server": ("127.0.0.1", 9093),
        "app": FakeApp(),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(layer(scope, receive, send))
    return sent


def counting(layer_cls: type) -> tuple[type, list[str]]:
    """``layer_cls`` whose dispatch records each path it saw."""
    seen: list[str] = []

    class Counting(layer_cls):  # type: ignore[misc, valid-type]
        async def dispatch(self, request: Any, call_next: Any) -> Any:
            seen.append(request.url.path)
            return await super().dispatch(request, call_next)

    return Counting, seen


@pytest.mark.parametrize(
    ("layer_cls", "bypassed", "served"),
    [
        (ControlAuthenticationMiddleware, "/v1/fleet/push-object", "/v1/control/list-runs"),
        (NodeAuthMiddleware, "/v1/runtime/push-object", "/v1/fleet/push-object"),
        (FleetEventLogMiddleware, "/v1/fleet/push-object", None),
    ],
)
def test_a_request_the_layer_only_passes_on_skips_its_dispatch(
    layer_cls: type, bypassed: str, served: str | None
) -> None:
    key = (layer_cls.__module__, layer_cls.__name__)
    counted, seen = counting(layer_cls)
    inner = Inner()
    layer = bypassing(counted, PASS_THROUGH[key])(inner)
    sent = call(layer, bypassed)
    assert seen == [] and inner.paths == [bypassed]
    assert sent[0]["status"] == 200 and sent[-1]["body"] == b"ok"
    if served is not None:  # a path the layer acts on still goes through its dispatch
        try:
            call(layer, served)
        except FlowerError:
            pass  # ControlAuthentication: no account access configured -> refused
        assert seen == [served]


def test_control_requests_are_still_authenticated_by_the_bypassing_layer() -> None:
    key = (ControlAuthenticationMiddleware.__module__, "ControlAuthenticationMiddleware")
    inner = Inner()
    layer = bypassing(ControlAuthenticationMiddleware, PASS_THROUGH[key])(inner)
    with pytest.raises(FlowerError, match="authentication is not initialized"):
        call(layer, "/v1/control/start-run")
    assert inner.paths == []  # the handler never ran


def test_the_superlink_app_gets_the_bypassing_layers_and_a_changed_flower_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import flwr.superlink.main as superlink_app

    for _, name in PASS_THROUGH:
        monkeypatch.setattr(superlink_app, name, getattr(superlink_app, name))
    assert bypass_idle_middleware() == 6
    classes = [m.cls for m in superlink_app._get_middleware()]
    ours = [c for c in classes if c.__module__ == flower_middleware.__name__]
    assert sorted(c.__name__ for c in ours) == sorted(name for _, name in PASS_THROUGH)
    assert any(c.__name__ == "ProtobufTranslationMiddleware" for c in classes)
    assert bypass_idle_middleware() == 6  # a second call changes nothing
    assert [m.cls for m in superlink_app._get_middleware()] == classes

    # A Flower whose module no longer holds the expected class: left alone, with a warning.
    monkeypatch.setattr(superlink_app, "NodeAuthMiddleware", object)
    with caplog.at_level("WARNING", logger="flwr"):
        assert bypass_idle_middleware() == 5
    assert superlink_app.NodeAuthMiddleware is object
    assert "NodeAuthMiddleware changed" in caplog.text
