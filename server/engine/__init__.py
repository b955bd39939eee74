"""Engines behind one small interface, chosen by name; heavy imports happen lazily.

An engine has ``tokenizer``, ``model_id``, ``max_context``, ``start()``, ``shutdown()``,
``submit(GenRequest, sink) -> Handle`` (thread-safe; raises QueueFull, EngineUnavailable,
InvalidRequest), ``stats() -> dict``, ``health() -> (ok, reason)`` and ``alive`` (False once
its thread has died or stopped).
"""

from __future__ import annotations

import importlib

ENGINES = {"torch": "server.engine.torch_engine:TorchEngine", "vllm": "server.engine.vllm_engine:VLLMEngine"}


def engine_class(name: str):
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module), cls)
