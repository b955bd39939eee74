"""Strategy registry: name -> "module:Class", imported on first use."""

from __future__ import annotations

import importlib

from ..errors import UnknownStrategy
from .base import Plan, Query, Retrieved, Strategy, StrategyContext  # noqa: F401

STRATEGIES = {
    "direct": "server.strategies.direct:Direct",
    "rag": "server.strategies.rag:Rag",
    "rag+ckplug": "server.strategies.ckplug:RagCKPlug",
    "kv": "server.strategies.kv:KV",
    "kv+ckplug": "server.strategies.kv_ckplug:KVCKPlug",
    "prag": "server.strategies.prag:Prag",
    "prag+rag": "server.strategies.prag:PragRag",
}
AUTO = "auto"  # not a strategy: asks the router (server.router) to choose one
NAMES = (AUTO, *STRATEGIES)  # what a request, an experiment arm or the server default may name
# what "+ckplug" can modify: strategies that put retrieved context in the prompt
_CKPLUG_BASES = ("rag", "kv")

_instances: dict[str, Strategy] = {}


def supported(offers: frozenset[str]) -> list[str]:
    """The strategies whose ``requires`` a runtime offering ``offers`` (engine capabilities
    and artefact services) meets, in registry order."""
    return [name for name in STRATEGIES if get_strategy(name).requires <= offers]


def get_strategy(name: str) -> Strategy:
    base, _, modifier = name.partition("+")
    if name not in STRATEGIES and modifier == "ckplug" and base not in _CKPLUG_BASES:
        raise UnknownStrategy(
            f"{name!r}: +ckplug reweights between decoding with and without retrieved context in the prompt, "
            f"and {base!r} has no such context to weigh; use it with rag", param="strategy")
    if name not in STRATEGIES:
        raise UnknownStrategy(f"unknown strategy {name!r}; known strategies: {', '.join(NAMES)}",
                              param="strategy")
    if name not in _instances:
        module, cls = STRATEGIES[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]
