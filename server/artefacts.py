"""The per-document artefacts a server keeps beside its documents: KV caches (``kv``) and
LoRA adapters (``prag``), each behind a service that stores, loads, builds and forgets.

Which services exist follows from the engine's capabilities (server.engine): KV caches
need an engine that injects KV prefixes (torch, or vllm through knowmux's KV connector;
both build them); adapters are served as per-row deltas by an engine with
``row_adapters`` or as LoRA requests by one with ``lora_requests``, and built on either
(trained through the torch engine's runner, or on vllm through a float32 copy of the
weights loaded for training). Without a data folder there are none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Settings
from .engine import KV_INJECTION, LORA_REQUESTS, ROW_ADAPTERS

log = logging.getLogger(__name__)

KINDS = ("kv", "adapters")  # what a build job or `knowmux ingest --build` may name


@dataclass
class Artefacts:
    kv: Optional[object] = None  # server.kv.service.KVService
    prag: Optional[object] = None  # server.prag.PragService or server.prag_vllm.VLLMPragService

    @classmethod
    def for_engine(cls, engine, prompts, settings: Settings, data_dir: Optional[Path]) -> "Artefacts":
        """The services ``engine`` can serve, stored under ``data_dir`` (None: none)."""
        if data_dir is None:
            return cls()
        from adapters.bank import AdapterBank
        from adapters.recipe import get_recipe

        caps = engine.capabilities
        from .tiers import open_tier

        bank = AdapterBank(data_dir / "adapters", open_tier(settings.kv_tier, "adapters"))
        recipe = get_recipe(settings.adapter_recipe)
        kv = prag = None
        if KV_INJECTION in caps:
            from .kv.service import KVService
            from .kv.store import KVStore
            from .strategies.kv import TORCH_ONLY

            kv = KVService(engine, prompts, KVStore(data_dir / "kv", settings.kv_memory_bytes,
                                                    settings.kv_store_bytes, open_tier(settings.kv_tier, "kv")))
            unused = {k: getattr(settings, k) for k, off in TORCH_ONLY.items() if getattr(settings, k) not in (None, off)}
            if unused and not kv.can_blend:
                log.warning("%s do not apply on the %s engine: recomputing joined tokens (CacheBlend, LegoLink) "
                            "and APE's attention run on the torch engine only, kv injects the joined caches as "
                            "they are", ", ".join(f"KNOWMUX_{k.upper()}={v}" for k, v in unused.items()), engine.name)
        if ROW_ADAPTERS in caps:
            from .prag import PragService

            prag = PragService(engine, prompts, bank, recipe, build_group=settings.adapter_build_group)
        elif LORA_REQUESTS in caps:
            from .prag_vllm import VLLMPragService

            prag = VLLMPragService(engine, prompts, bank, recipe, data_dir / "combined",
                                   build_group=settings.adapter_build_group)
        return cls(kv, prag)

    @property
    def services(self) -> frozenset[str]:
        """What strategies may require of the artefacts: "kv" (stored caches), "adapters"."""
        return frozenset(name for name, s in (("kv", self.kv), ("adapters", self.prag)) if s is not None)

    def builder(self, kind: str):
        """The service that builds artefacts of ``kind`` (one of ``KINDS``), or None if this
        engine cannot; each has ``build_document(doc) -> bool``."""
        return {"kv": self.kv, "adapters": self.prag}[kind]

    def stored(self, doc) -> dict[str, bool]:
        """Which artefacts are stored for ``doc`` (the kinds this engine serves)."""
        return {kind: service.has(doc) for kind, service in (("kv", self.kv), ("adapter", self.prag))
                if service is not None}

    def forget(self, doc, kb) -> list[str]:
        """After ``doc`` was deleted from ``kb``: remove its KV cache and adapter unless another
        stored document has the same content (artefacts are keyed by content, so they are
        shared). Returns the kinds removed."""
        if kb.store.ids_with_hash(doc.content_hash):
            return []
        return [kind for kind, service in (("kv", self.kv), ("adapter", self.prag))
                if service is not None and service.forget(doc)]
