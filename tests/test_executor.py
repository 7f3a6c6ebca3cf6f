"""The in-process executor runs only the site's installed ClientApp."""

from __future__ import annotations

import signal

import httpx
import pytest
from flwr.cli.build import build_fab_from_files

from medfed.client.executor import (
    INSTALLED_CLIENTAPP,
    bundle_clientapp,
    retry_invoker,
    task_refusal_ends_the_task,
)
from medfed.server.control import _fab_bytes


def test_medfed_bundle_names_the_installed_clientapp() -> None:
    assert bundle_clientapp(_fab_bytes()) == INSTALLED_CLIENTAPP


def test_foreign_bundle_is_detected() -> None:
    pyproject = _fab_bytes_text().replace(INSTALLED_CLIENTAPP, "evil.client:app")
    fab = build_fab_from_files({"pyproject.toml": pyproject.encode()})[0]
    assert bundle_clientapp(fab) == "evil.client:app"


def _fab_bytes_text() -> str:
    from importlib.resources import files

    return files("medfed.server").joinpath("flower_app/pyproject.toml").read_text()


def _status_error(code: int, text: str = "") -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/pull-object")
    return httpx.HTTPStatusError(
        f"{code}", request=request, response=httpx.Response(code, text=text, request=request)
    )


def test_a_withdrawn_task_fails_alone_and_does_not_interrupt_the_daemon() -> None:
    """Flower's retry SIGINTs its own process on a 401; in the daemon that stopped the site."""
    interrupts: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: interrupts.append(sig))
    try:
        invoker = retry_invoker()
        calls = 0

        def refused() -> None:
            nonlocal calls
            calls += 1
            raise _status_error(401)

        with pytest.raises(httpx.HTTPStatusError, match="401"):
            invoker.invoke(refused)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert interrupts == [] and calls == 1


def test_other_refusals_keep_flowers_handling() -> None:
    giveup = task_refusal_ends_the_task(lambda exc: False)
    assert giveup(_status_error(401)) is True
    assert giveup(_status_error(404)) is False  # Flower's answer, not ours
    assert task_refusal_ends_the_task(None)(_status_error(500)) is False
