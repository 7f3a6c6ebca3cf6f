"""Aggregation strategies by name: Flower's Message-API strategies and researchers' own."""

from medfed.strategies.registry import STRATEGIES, build_strategy, strategy_options

__all__ = ["STRATEGIES", "build_strategy", "strategy_options"]
