"""Everything a serving process holds, built from Settings: engine, knowledge base,
pipeline, metrics. The API's lifespan builds one; tests build one around a tiny model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .config import Settings
from .jobs import JobManager
from .metrics import Metrics
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def worker_limits(settings: Settings):
    from .engine.worker import WorkerLimits

    return WorkerLimits(max_batch_size=settings.max_batch_size, max_tokens_in_flight=settings.max_tokens_in_flight,
                        max_queue=settings.max_queue, step_token_budget=settings.step_token_budget,
                        prefix_cache_tokens=settings.prefix_cache_tokens)


@dataclass
class Runtime:
    settings: Settings
    engine: object
    kb: object
    pipeline: Pipeline
    metrics: Metrics
    jobs: JobManager = field(default_factory=JobManager)
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, settings: Settings, engine=None, embedder=None) -> "Runtime":
        from indexes import KnowledgeBase

        if engine is None:
            from .engine import engine_class
            from .modelfiles import resolve_model

            path = resolve_model(settings.model)
            log.info("loading %s with the %s engine", path, settings.engine)
            engine = engine_class(settings.engine).from_folder(path, limits=worker_limits(settings),
                                                              threads=settings.threads)
        if embedder is None:
            from indexes.embedder import Embedder

            embedder = Embedder()
        kb = KnowledgeBase(settings.data_dir, embedder)
        return cls(settings, engine, kb, Pipeline(engine, kb, settings, data_dir=settings.data_dir), Metrics())

    def start(self) -> None:
        self.engine.observe_steps(self.metrics.on_step)
        self.metrics.bind_engine(self.engine)
        self.engine.start()

    def shutdown(self) -> None:
        self.jobs.shutdown()
        self.engine.shutdown()
        self.kb.close()
