"""Strategy registry: name -> "module:Class", imported on first use."""

from __future__ import annotations

import importlib

from ..errors import UnknownStrategy
from .base import Plan, Query, Retrieved, Strategy, StrategyContext  # noqa: F401

STRATEGIES = {
    "direct": "server.strategies.direct:Direct",
    "rag": "server.strategies.rag:Rag",
}

_instances: dict[str, Strategy] = {}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise UnknownStrategy(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}",
                              param="strategy")
    if name not in _instances:
        module, cls = STRATEGIES[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]
