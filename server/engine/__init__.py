"""Engines behind one small interface, chosen by name; heavy imports happen lazily.

An engine has ``name``, ``capabilities`` (a frozenset of the names below), ``tokenizer``,
``model_id``, ``max_context``, ``start()``, ``shutdown()``, ``submit(GenRequest, sink) ->
Handle`` (thread-safe; raises QueueFull, EngineUnavailable, InvalidRequest), ``stats() ->
dict``, ``health() -> (ok, reason)``, ``alive`` (False once its thread has died or stopped)
and ``generation_config`` (the model's transformers GenerationConfig, or None).

What the rest of the server may ask of an engine beyond generating text is read from its
``capabilities``, never from its class or name:
"""

from __future__ import annotations

import importlib

LOGITS_HOOK = "logits_hook"  # GenRequest.logits_hook over several rows decoded together (CK-PLUG, the probe)
KV_INJECTION = "kv_injection"  # rows that start from an injected KV prefix (server.kv), built by its forward
ROW_ADAPTERS = "row_adapters"  # per-row LoRA deltas (prag on the engine's forward), and training adapters
LORA_REQUESTS = "lora_requests"  # adapters served as vLLM LoRA requests (prag through folded adapters)

ENGINES = {"torch": "server.engine.torch_engine:TorchEngine", "vllm": "server.engine.vllm_engine:VLLMEngine"}


def engine_class(name: str):
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module), cls)
