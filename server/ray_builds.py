"""Build jobs whose model work runs on a Ray cluster (``--builds ray://head:10001``).

A replica still holds the job (it claims it from the shared store, renews its lease,
records its progress; server.shared_jobs), but each group of documents is built by a Ray
actor, ``BuildWorker``, instead of the replica's own engine: the actor loads the same
model folder with the same engine settings (so its KV caches and adapters carry the
replica's fingerprint), reads the documents from the shared PostgreSQL store and writes
what it builds to the shared tier, where every replica finds it. Serving replicas then
spend no engine time on builds; a GPU node of the cluster does them.

Hence ``--builds`` needs ``--store postgresql://...`` and ``--kv-tier``: a Ray worker on
another machine reads neither a replica's SQLite file nor its local folders. Each replica
starts one actor (``KNOWMUX_RAY_GPUS`` GPUs each: 1 when the replica's torch sees a GPU,
else 0), the first time it builds. ``ray:local`` starts a Ray instance inside the replica
(one machine; what the tests use).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

from .config import Settings
from .jobs import Builder, build_ids, outcome

log = logging.getLogger(__name__)


class BuildWorker:
    """Runs on a Ray worker: the served model, the artefact services, the shared store."""

    def __init__(self, settings: Settings):
        from indexes.pgstore import PostgresStore

        from .artefacts import Artefacts
        from .prompt import PromptBuilder, ensure_chat_template
        from .runtime import engine_for

        self.engine = engine_for(settings)
        self.engine.start()
        ensure_chat_template(self.engine.tokenizer, settings.chat_template)
        prompts = PromptBuilder(self.engine.tokenizer, settings.prompt_layout)
        folder = Path(tempfile.mkdtemp(prefix="knowmux-ray-build-"))  # a local copy; the tier is what is shared
        self.artefacts = Artefacts.for_engine(self.engine, prompts, settings, folder)
        self.store = PostgresStore(settings.store)

    def build(self, kind: str, doc_ids: list[str]) -> list[tuple[str, str]]:
        """Per document: ("built" | "skipped" | "failed", the error for a failure)."""
        service = self.artefacts.builder(kind)
        if service is None:
            return [("failed", f"the Ray worker's {self.engine.name} engine cannot build {kind}")] * len(doc_ids)
        results = build_ids(service, self.store, doc_ids)  # the store answers get_many as a knowledge base does
        return [(outcome(r), f"{type(r).__name__}: {r}" if outcome(r) == "failed" else "") for r in results]

    def where(self) -> str:
        return f"{os.uname().nodename} pid {os.getpid()}"


class RayBuilds:
    """The replica's side: one ``BuildWorker`` actor, and builders that call it."""

    def __init__(self, settings: Settings):
        try:
            import ray
        except ImportError:
            raise ValueError("--builds needs Ray: pip install 'knowmux[ray]' (ray>=2.40)") from None

        self.settings, self._ray = settings, ray
        url = settings.builds
        self._started_here = url == "ray:local"
        if not ray.is_initialized():
            if self._started_here:
                ray.init(num_cpus=max(1, (os.cpu_count() or 2) // 2), include_dashboard=False,
                         object_store_memory=80 * 1024 * 1024, logging_level=logging.WARNING,
                         ignore_reinit_error=True)
            else:
                ray.init(address=url, logging_level=logging.WARNING)
        self._actor = None
        self._lock = threading.Lock()

    def _worker(self):
        with self._lock:
            if self._actor is None:
                gpus = float(os.environ.get("KNOWMUX_RAY_GPUS", 1 if _has_gpu() else 0))
                actor = self._ray.remote(num_gpus=gpus, num_cpus=1)(BuildWorker)
                self._actor = actor.remote(self.settings)
                log.info("Ray build worker started on %s", self._ray.get(self._actor.where.remote()))
            return self._actor

    def builder(self, kind: str, group: int) -> Builder:
        return Builder(lambda doc_ids: self.build(kind, doc_ids), group)

    def build(self, kind: str, doc_ids: list[str]) -> list:
        """``Builder``'s contract: per document True (built), False (stored already) or the exception."""
        try:
            out = self._ray.get(self._worker().build.remote(kind, list(doc_ids)))
        except self._ray.exceptions.RayActorError:  # the actor died (node lost, out of memory): a new one next group
            with self._lock:
                self._actor = None
            raise
        return [True if what == "built" else False if what == "skipped" else RuntimeError(f"on the Ray worker: {why}")
                for what, why in out]

    def shutdown(self) -> None:
        if self._actor is not None:
            self._ray.kill(self._actor)
            self._actor = None
        if self._started_here:
            self._ray.shutdown()


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def check(settings: Settings) -> Optional[str]:
    """Why ``--builds`` cannot run with these settings (None: it can)."""
    if settings.builds is None:
        return None
    if not (settings.builds == "ray:local" or settings.builds.startswith("ray://")):
        return f"KNOWMUX_BUILDS must be ray://head:port or ray:local, got {settings.builds!r}"
    from indexes.store import store_kind

    if store_kind(settings.store) != "postgresql" or not settings.kv_tier:
        return ("builds on Ray need a shared document store (--store postgresql://...) and a shared tier "
                "(--kv-tier): a Ray worker reads the documents from the one and writes what it builds to the other")
    return None
