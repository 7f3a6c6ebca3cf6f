"""Registries: duplicates rejected, typos answered with 'did you mean', plugins by entry point."""

from __future__ import annotations

import pytest
from flwr.serverapp import strategy as fl

from medfed.core.errors import ConfigError, MedfedError, UnknownNameError
from medfed.core.registry import Registry
from medfed.strategies import STRATEGIES, build_strategy, strategy_options
from medfed.strategies.registry import check_options
from medfed.tasks import TASKS, get_task


def test_duplicate_name_rejected() -> None:
    reg: Registry[int] = Registry("thing", plural="things", entry_point_group="medfed.none")
    reg.register("a", 1)
    with pytest.raises(MedfedError, match="registered twice"):
        reg.register("a", 2)


def test_typo_gets_did_you_mean() -> None:
    with pytest.raises(UnknownNameError) as err:
        get_task("tiny-sge")
    assert "did you mean 'tiny-seg'" in err.value.fix
    assert "tiny-seg" in err.value.expected
    with pytest.raises(UnknownNameError) as err:
        STRATEGIES.get("fedavgg")
    assert "'fedavg'" in err.value.fix


def test_entry_point_plugin_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEP:
        name, value = "my-fedavg", "mypkg:MyFedAvg"

        def load(self) -> type:
            return fl.FedAvg

    reg: Registry[type] = Registry(
        "strategy", plural="strategies", entry_point_group="medfed.strategies"
    )
    monkeypatch.setattr("medfed.core.registry.entry_points", lambda group: [FakeEP()])
    assert reg.get("my-fedavg") is fl.FedAvg
    assert "mypkg:MyFedAvg" in reg.origin("my-fedavg")


NEEDED = {"qfedavg": {"client_learning_rate": 0.1}}


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_builtin_strategy_builds(name: str) -> None:
    strategy = build_strategy(name, NEEDED.get(name, {}), min_sites=3)
    assert isinstance(strategy, fl.Strategy)
    if hasattr(strategy, "min_available_nodes"):
        assert strategy.min_available_nodes == 3


def test_strategy_options_checked() -> None:
    assert "proximal_mu" in strategy_options("fedprox")
    with pytest.raises(ConfigError) as err:
        check_options("fedprox", {"proximal_m": 0.1})
    assert "proximal_mu" in err.value.fix
    with pytest.raises(ConfigError, match="set by medfed"):
        check_options("fedavg", {"min_train_nodes": 1})
    assert build_strategy("fedprox", {"proximal_mu": 0.5}, min_sites=2).proximal_mu == 0.5
    with pytest.raises(ConfigError, match="client_learning_rate"):
        check_options("qfedavg", {})


def test_tiny_seg_is_registered() -> None:
    assert "tiny-seg" in TASKS.names()


@pytest.mark.parametrize("name", ["fedmedian", "krum", "fedtrimmedavg", "bulyan"])
def test_robust_strategy_refused_with_secure_aggregation(name: str) -> None:
    from medfed.strategies.registry import check_secure_aggregation

    with pytest.raises(ConfigError, match="individual update"):
        check_secure_aggregation(name, "default")
    check_secure_aggregation(name, "off")
    check_secure_aggregation("fedadam", "strict")
