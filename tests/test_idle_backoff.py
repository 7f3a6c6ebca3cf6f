"""Site polling: fast while a federation is busy, Flower's 3 s after a long quiet."""

from __future__ import annotations

import time
from types import ModuleType

import pytest

from medfed.core.flower_tuning import back_off_idle_polls
from medfed.core.idle_backoff import IdleBackoff


def test_polls_stay_fast_while_busy_and_slow_down_to_the_cap_when_idle() -> None:
    pace = IdleBackoff(0.2, cap=3.0, hot_s=10.0)
    now = time.monotonic()
    assert pace.interval(now) == 0.2
    assert pace.interval(now + 9.9) == 0.2
    assert pace.interval(now + 20.0) == pytest.approx(0.4, rel=0.01)
    assert pace.interval(now + 30.0) == pytest.approx(0.8, rel=0.01)
    assert pace.interval(now + 3600.0) == 3.0
    pace.active()
    assert pace.interval() == 0.2


def test_bad_pacing_is_refused() -> None:
    with pytest.raises(ValueError, match="base <= cap"):
        IdleBackoff(5.0, cap=3.0)


def test_the_supernode_patch_paces_idle_sleeps_and_marks_work() -> None:
    module = ModuleType("fake_supernode")
    module.time = time  # type: ignore[attr-defined]
    pace = IdleBackoff(0.01, cap=0.05, hot_s=0.01)

    def push() -> str:
        return "pushed"

    module._push_messages = push  # type: ignore[attr-defined]
    assert back_off_idle_polls(module, pace, idle_sleep=3, activity="_push_messages")
    start = time.monotonic()
    module.time.sleep(3)  # an idle poll: the pace's interval, not 3 s
    module.time.sleep(0.5)  # any other wait: capped at the base
    assert time.monotonic() - start < 0.5
    time.sleep(0.05)
    assert pace.interval() > 0.01  # idle long enough: slower
    assert module._push_messages() == "pushed"
    assert pace.interval() == 0.01  # work: fast again


def test_a_changed_flower_module_is_left_alone() -> None:
    module = ModuleType("fake_supernode")  # no `time`, no `_push_messages`
    assert not back_off_idle_polls(
        module, IdleBackoff(0.2), idle_sleep=3, activity="_push_messages"
    )
    assert not hasattr(module, "time")


def test_the_heartbeat_interval_is_declared_and_paced_by_the_sites_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL

    from medfed.core.flower_tuning import HEARTBEAT_MODULES, set_heartbeat_interval

    modules = [importlib.import_module(name) for name in HEARTBEAT_MODULES]
    for module in modules:  # undone after the test
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", HEARTBEAT_DEFAULT_INTERVAL)
    assert set_heartbeat_interval(10.0)
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [10.0, 10.0]
    # once Flower's names no longer hold its default, nothing is patched half-way
    monkeypatch.setattr(modules[1], "HEARTBEAT_DEFAULT_INTERVAL", 45)
    assert not set_heartbeat_interval(12.0)
    assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [10.0, 45]
