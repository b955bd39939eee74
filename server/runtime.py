"""Everything a serving process holds, built from Settings: engine, knowledge base,
pipeline, metrics. The API's lifespan builds one; tests build one around a tiny model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .api.auth import Keys, check_exposure
from .config import Settings
from .errors import StrategyUnavailable
from .jobs import Builder, JobManager, build_ids
from .metrics import Metrics
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def worker_limits(settings: Settings):
    from .engine.types import WorkerLimits

    return WorkerLimits(max_batch_size=settings.max_batch_size, max_tokens_in_flight=settings.max_tokens_in_flight,
                        max_queue=settings.max_queue, step_token_budget=settings.step_token_budget,
                        prefix_cache_tokens=settings.prefix_cache_tokens,
                        prefix_cache_block=settings.prefix_cache_block,
                        background_interval_s=settings.build_yield_s)


def engine_for(settings: Settings):
    """The engine ``settings`` name, loaded from its model folder with the settings' worker
    limits and threads: the one construction for the server and the CLI's builds."""
    from .engine import engine_class
    from .modelfiles import resolve_model

    path = resolve_model(settings.model)
    log.info("loading %s with the %s engine", path, settings.engine)
    return engine_class(settings.engine).from_folder(path, limits=worker_limits(settings), threads=settings.threads)


def embedder_for(engine):
    """The sentence embedder for a process serving ``engine`` (None: no engine). Where the
    engine has a compute thread, the embedder is made and run there, and the knowledge
    base's FAISS searches follow it: one OpenMP team (server.engine.compute)."""
    from indexes.embedder import Embedder

    run = getattr(engine, "run_compute", None)
    return run(lambda: Embedder(run=run)) if run is not None else Embedder()


@dataclass
class Runtime:
    settings: Settings
    engine: object
    kb: object
    pipeline: Pipeline
    metrics: Metrics
    keys: object = None  # server.api.auth.Keys
    jobs: JobManager = None
    started_at: float = field(default_factory=time.time)

    @classmethod
    def build(cls, settings: Settings, engine=None, embedder=None) -> "Runtime":
        from indexes import KnowledgeBase

        if engine is None:
            engine = engine_for(settings)
        if embedder is None:
            embedder = embedder_for(engine)
        keys = Keys.from_settings(settings)
        check_exposure(settings, keys)
        kb = KnowledgeBase(settings.data_dir, embedder)
        return cls(settings, engine, kb, Pipeline(engine, kb, settings, data_dir=settings.data_dir), Metrics(), keys,
                   JobManager(settings.data_dir / "jobs"))

    def builder(self, kind: str) -> Builder:
        """The builder of a kind ("kv", "adapters") for jobs; raises StrategyUnavailable
        when this engine cannot build it."""
        service = self.pipeline.builder(kind)
        if service is None:
            raise StrategyUnavailable(f"the {self.engine.name} engine cannot build {kind}", param="build")

        return Builder(lambda doc_ids: build_ids(service, self.kb, doc_ids), getattr(service, "build_group", 1))

    def start(self) -> None:
        self.engine.observe_steps(self.metrics.on_step)
        self.metrics.bind_engine(self.engine)
        self.engine.start()
        self.jobs.resume(self.builder)  # builds a previous process left unfinished

    def shutdown(self) -> None:
        self.jobs.shutdown()
        self.engine.shutdown()
        self.kb.close()
