"""Strategy registry: names -> Flower Message-API strategy classes.

A researcher's strategy is a subclass of ``flwr.serverapp.strategy.Strategy``
(usually of FedAvg) in one file, exposed through the ``medfed.strategies`` entry
point group. Options given on ``medfed run --strategy-option key=value`` are
checked against the class's keyword arguments before a run starts.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from flwr.serverapp import strategy as fl

from medfed.core.errors import ConfigError
from medfed.core.registry import Registry

STRATEGIES: Registry[type[fl.Strategy]] = Registry(
    "strategy", plural="strategies", entry_point_group="medfed.strategies"
)

_BUILTINS: dict[str, type[fl.Strategy]] = {
    "fedavg": fl.FedAvg,
    "fedavgm": fl.FedAvgM,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedadagrad": fl.FedAdagrad,
    "fedmedian": fl.FedMedian,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "krum": fl.Krum,
    "multikrum": fl.MultiKrum,
    "bulyan": fl.Bulyan,
    "qfedavg": fl.QFedAvg,
}
for _name, _cls in _BUILTINS.items():
    STRATEGIES.register(_name, _cls)

# Options medfed sets itself from the run config; a user may not pass them.
_MANAGED = {
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
}


REQUIRED = "(required)"


def strategy_options(name: str) -> dict[str, Any]:
    """The options a user may set for strategy ``name``: defaults, or ``REQUIRED``."""
    cls = STRATEGIES.get(name)
    params = inspect.signature(cls.__init__).parameters
    return {
        p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
        for p in params.values()
        if p.name != "self"
        and p.name not in _MANAGED
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def check_options(name: str, options: dict[str, Any]) -> None:
    """Fail before a run starts if an option is unknown or managed by medfed."""
    allowed = strategy_options(name)
    for key in options:
        if key in _MANAGED:
            raise ConfigError(
                f"The strategy option {key!r} is set by medfed from the run configuration.",
                where=f"--strategy-option {key}=...",
                fix="use --min-sites for the node counts; drop this option",
            )
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            raise ConfigError(
                f"Strategy {name!r} has no option {key!r}.",
                where=f"--strategy-option {key}=...",
                expected=f"one of: {', '.join(sorted(allowed)) or '(none)'}",
                fix=f"did you mean {close[0]!r}?" if close else "see `medfed strategies`",
            )
    required = [k for k, v in allowed.items() if v is REQUIRED and k not in options]
    if required:
        raise ConfigError(
            f"Strategy {name!r} needs option(s) {', '.join(required)}.",
            fix=" ".join(f"--strategy-option {k}=VALUE" for k in required),
        )


# Strategies that look at each site's update (robust statistics, per-site losses): with
# secure aggregation the server only ever holds the sum, so they cannot run.
NEEDS_INDIVIDUAL_UPDATES = {"fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "qfedavg"}


def check_secure_aggregation(name: str, mode: str) -> None:
    """Refuse a strategy that needs individual updates when secure aggregation is on."""
    if mode != "off" and name in NEEDS_INDIVIDUAL_UPDATES:
        raise ConfigError(
            f"Strategy {name!r} needs every site's individual update, but with secure "
            f"aggregation ({mode}) the server only learns their sum.",
            where="--strategy / --secure-aggregation",
            expected="a strategy that aggregates a (weighted) mean: fedavg, fedprox, fedavgm, "
            "fedadam, fedyogi, fedadagrad",
            fix=f"choose one of those, or (debugging only) --secure-aggregation off with {name}",
        )


def build_strategy(name: str, options: dict[str, Any], *, min_sites: int) -> fl.Strategy:
    """Instantiate strategy ``name`` with validated options and medfed's node counts."""
    check_options(name, options)
    cls = STRATEGIES.get(name)
    params = inspect.signature(cls.__init__).parameters
    managed = {
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
    }
    kwargs = {k: v for k, v in managed.items() if k in params}
    return cls(**kwargs, **options)
