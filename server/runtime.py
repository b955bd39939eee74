"""Everything a serving process holds, built from Settings: engine, knowledge base, the
artefact services, router, experiments, pipeline, metrics. The one place that assembles
them (``assemble``); the API's lifespan builds a Runtime, the CLI's builds and tests build
the same parts around a given engine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .api.auth import Keys, check_exposure
from .artefacts import Artefacts
from .config import Settings
from .errors import StrategyUnavailable
from .jobs import Builder, JobManager, build_ids
from .metrics import Metrics
from .options import KV_OPTIONS
from .pipeline import Pipeline
from .prompt import PromptBuilder, ensure_chat_template
from .router import Experiments, Router
from .strategies import NAMES, StrategyContext, supported
from .tiers import open_tier

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

    deployment = {}
    if settings.engine == "vllm":  # vLLM's own deployment settings
        deployment = dict(max_model_len=settings.max_context, tensor_parallel_size=settings.tensor_parallel_size,
                          gpu_memory_utilization=settings.gpu_memory_utilization, max_loras=settings.max_loras,
                          max_lora_rank=settings.max_lora_rank)
    elif settings.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size needs --engine vllm (the torch engine runs on one device)")
    path = resolve_model(settings.model)
    log.info("loading %s with the %s engine", path, settings.engine)
    return engine_class(settings.engine).from_folder(path, limits=worker_limits(settings), threads=settings.threads,
                                                     device=settings.device, dtype=settings.dtype, **deployment)


def embedder_for(engine, device: str = "auto"):
    """The sentence embedder for a process serving ``engine`` (None: no engine), on the
    engine's device (else ``device``: auto takes the first GPU if torch sees one). Where the
    engine has a compute thread, the embedder is made and run there, and the knowledge
    base's FAISS searches follow it: one OpenMP team (server.engine.compute)."""
    from indexes.embedder import Embedder

    where = getattr(engine, "device", None)
    if where is None:
        from .engine.device import resolve_device

        where = str(resolve_device(device))
    run = getattr(engine, "run_compute", None)
    return run(lambda: Embedder(device=where, run=run)) if run is not None else Embedder(device=where)


@dataclass
class Parts:
    """What ``assemble`` builds around an engine and a knowledge base."""

    prompts: PromptBuilder
    artefacts: Artefacts
    ctx: StrategyContext
    supported: list[str]  # the strategies this engine and these artefacts can run
    router: Router
    experiments: Experiments
    pipeline: Pipeline


def assemble(engine, kb, settings: Settings, data_dir=None) -> Parts:
    """The services a server runs on ``engine`` and ``kb``: prompt layout, artefact services
    (as the engine's capabilities allow), the strategies they support, the router (with
    the confidence probe where the engine runs logits hooks), experiments and the pipeline."""
    from .engine import LOGITS_HOOK

    ensure_chat_template(engine.tokenizer, settings.chat_template)  # before anything renders a prompt
    prompts = PromptBuilder(engine.tokenizer, settings.prompt_layout)
    artefacts = Artefacts.for_engine(engine, prompts, settings, data_dir)
    ctx = StrategyContext(kb=kb, prompts=prompts, kv=artefacts.kv, prag=artefacts.prag,
                          kv_defaults={k: getattr(settings, k) for k in KV_OPTIONS})
    runs = supported(engine.capabilities | artefacts.services)
    probe = None
    if settings.router_probe and LOGITS_HOOK in engine.capabilities:
        from .router.probe import ConfidenceProbe

        probe = ConfidenceProbe(engine, prompts)
    router = Router(ctx, runs, min_score=settings.router_min_score, probe=probe,
                    one_passage_gap=settings.router_one_passage_gap,
                    classifier_dir=settings.router_classifier or (
                        (data_dir / "router") if data_dir is not None else None),
                    tier=open_tier(settings.kv_tier, "router"), model_id=engine.model_id)
    experiments = Experiments(settings.experiments, list(NAMES))
    return Parts(prompts, artefacts, ctx, runs, router, experiments,
                 Pipeline(engine, ctx, router, experiments, settings, runs, sampling_defaults(engine, settings)))


def sampling_defaults(engine, settings: Settings) -> dict:
    """What a request that sets no temperature or top_p gets, each on its own: the server's
    setting (--default-temperature, --default-top-p), else the model folder's
    generation_config.json (its explicitly set values, as vLLM applies them), else
    OpenAI's 1.0. Logged once."""
    model = {}
    config = getattr(engine, "generation_config", None)
    if config is not None:
        model = {k: v for k, v in config.to_diff_dict().items() if k in ("temperature", "top_p")}
    out, source = {}, {}
    for key, setting in (("temperature", settings.default_temperature), ("top_p", settings.default_top_p)):
        if setting is not None:
            out[key], source[key] = float(setting), "server setting"
        elif key in model:
            out[key], source[key] = float(model[key]), "model generation_config"
        else:
            out[key], source[key] = 1.0, "OpenAI default"
    log.info("default sampling: %s", ", ".join(f"{k}={v} ({source[k]})" for k, v in out.items()))
    return out


def job_manager(settings: Settings, store) -> JobManager:
    """Build jobs kept beside the documents: files in the data dir with the embedded store,
    rows claimed by any replica with a shared one (server.shared_jobs)."""
    if getattr(store, "kind", "sqlite") == "postgresql":
        from .shared_jobs import SharedJobManager

        return SharedJobManager(store.url, lease_s=settings.job_lease_s)
    return JobManager(settings.data_dir / "jobs")


@dataclass
class Runtime:
    settings: Settings
    engine: object
    kb: object
    parts: Parts
    metrics: Metrics
    keys: object = None  # server.api.auth.Keys
    jobs: JobManager = None
    builds: object = None  # server.ray_builds.RayBuilds: build groups on a Ray actor (--builds)
    started_at: float = field(default_factory=time.time)

    @property
    def pipeline(self) -> Pipeline:
        return self.parts.pipeline

    @property
    def artefacts(self) -> Artefacts:
        return self.parts.artefacts

    @property
    def router(self) -> Router:
        return self.parts.router

    @property
    def experiments(self) -> Experiments:
        return self.parts.experiments

    @property
    def prompts(self) -> PromptBuilder:
        return self.parts.prompts

    @classmethod
    def build(cls, settings: Settings, engine=None, embedder=None) -> "Runtime":
        from indexes import KnowledgeBase

        if engine is None:
            engine = engine_for(settings)
        if embedder is None:
            embedder = embedder_for(engine, settings.device)
        keys = Keys.from_settings(settings)
        check_exposure(settings, keys)
        kb = KnowledgeBase(settings.data_dir, embedder, store=settings.store)
        builds = None
        if settings.builds:
            from .ray_builds import RayBuilds

            builds = RayBuilds(settings)
        return cls(settings, engine, kb, assemble(engine, kb, settings, data_dir=settings.data_dir), Metrics(), keys,
                   job_manager(settings, kb.store), builds)

    def placement(self) -> dict:
        """Where things run and are kept: the engine's device, dtype and KV pool, the
        embedder's device, the FAISS backend and the KV store's tiers."""
        info = dict(self.engine.info()) if hasattr(self.engine, "info") else {}
        embedder = getattr(self.kb, "embedder", None) if self.kb is not None else None
        info["embedder_device"] = getattr(embedder, "device", None)
        info["faiss"] = "cpu"  # exact inner-product search over the documents (indexes.vector)
        store = getattr(self.kb, "store", None)
        info["document_store"] = {"kind": store.kind, "at": store.describe()} if store is not None else None
        kv = self.artefacts.kv
        info["kv_store"] = kv.store.info() if kv is not None else None
        return info

    def builder(self, kind: str) -> Builder:
        """The builder of a kind ("kv", "adapters") for jobs; raises StrategyUnavailable
        when this engine cannot build it."""
        service = self.artefacts.builder(kind)
        if service is None:
            raise StrategyUnavailable(f"the {self.engine.name} engine cannot build {kind}", param="build")

        group = getattr(service, "build_group", 1)
        if self.builds is not None:  # the model work on a Ray actor, the job held here
            return self.builds.builder(kind, group)
        return Builder(lambda doc_ids: build_ids(service, self.kb, doc_ids), group)

    def start(self) -> None:
        self.engine.observe_steps(self.metrics.on_step)
        self.metrics.bind_engine(self.engine)
        self.engine.start()
        self.jobs.resume(self.builder)  # builds a previous process left unfinished

    def shutdown(self) -> None:
        self.jobs.shutdown()
        if self.builds is not None:
            self.builds.shutdown()
        self.engine.shutdown()
        self.kb.close()
