"""Settings: one frozen dataclass, from defaults, then KNOWMUX_* environment, then CLI flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Settings:
    model: Optional[str] = None  # a local causal-LM folder; None = the converted SmolLM2-135M-Instruct
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "knowmux"
    engine: str = "torch"
    device: str = "auto"  # the torch engine and the embedder: auto, cpu, cuda, cuda:N (server.engine.device)
    dtype: str = "auto"  # auto (float32 on CPU, the folder's dtype on a GPU), float32, bfloat16, float16
    threads: Optional[int] = None  # torch intra-op threads; None = all cores
    # the vllm engine's deployment (vLLM's own settings; max_context is its --max-model-len)
    tensor_parallel_size: int = 1  # GPUs per replica; >1 runs vLLM's sampler in workers: no logits hooks (CK-PLUG)
    gpu_memory_utilization: float = 0.9  # the GPU memory vLLM may take for weights and its KV cache
    max_loras: int = 8  # adapters (document sets) vLLM holds at once for prag
    max_lora_rank: int = 16  # the largest adapter rank vLLM accepts (0 turns LoRA off)
    # continuous batching limits
    max_batch_size: int = 16
    max_tokens_in_flight: int = 65536  # KV slots (prompt + max_tokens per row); 46 KB each on SmolLM2 fp32
    max_queue: int = 64
    step_token_budget: int = 512
    prefix_cache_tokens: int = 16384  # automatic prefix cache of shared prompt blocks (0 = off)
    prefix_cache_block: int = 16  # tokens per prefix-cache block: the granularity of sharing
    build_yield_s: float = 3.0  # while requests run, at most one adapter training step per this interval
    # request limits
    default_max_tokens: int = 256
    # a request that sets no temperature/top_p: these, else the model's generation_config, else 1.0
    default_temperature: Optional[float] = None
    default_top_p: Optional[float] = None
    max_tokens_limit: int = 4096
    max_context: Optional[int] = None  # None = the model's max_position_embeddings
    chat_template: Optional[Path] = None  # a Jinja chat template file, for a model folder without one (or to replace it)
    prompt_layout: str = "system"  # where the passages go in the prompt: server.prompt.LAYOUTS
    default_top_k: int = 3
    max_top_k: int = 20
    max_document_chars: int = 100_000
    max_documents_per_call: int = 1000
    max_body_bytes: int = 16 * 1024 * 1024
    kv_memory_bytes: int = 512 * 1024 * 1024  # memory LRU in front of the on-disk KV store
    kv_store_bytes: int = 0  # disk budget of the KV store, least recently used evicted first (0 = no limit)
    kv_tier: Optional[str] = None  # a second tier for KV caches and adapters, shared by replicas (server.tiers)
    # the document store: None = SQLite in the data dir; postgresql://... = shared by replicas,
    # build jobs included (indexes.pgstore, server.shared_jobs)
    store: Optional[str] = None
    job_lease_s: float = 30.0  # shared store: a running job whose replica is silent this long is taken over
    builds: Optional[str] = None  # ray://head:port (or ray:local): build groups run on a Ray actor (server.ray_builds)
    adapter_recipe: str = "passage-4ep"  # adapters.recipe.PRESETS
    adapter_build_group: int = 8  # documents whose adapters are augmented and trained together
    kv_recompute: float = 0.0  # default CacheBlend fraction of non-exact passage tokens recomputed by `kv`
    kv_recompute_refresh: bool = False  # default: CacheBlend's tokens chosen again at every layer (gradual filtering)
    kv_link_tokens: int = 0  # default LegoLink count: first tokens of each non-first passage recomputed by `kv`
    # default passage positions of `kv`: "parallel" (APE's) or "sequential"; None: parallel,
    # or sequential when a recompute (kv_recompute, kv_link_tokens) applies
    kv_positions: Optional[str] = None
    # default APE attention temperature of `kv` over its passages (1 = off); None: 0.8 with
    # parallel positions on the torch engine, else 1 (server.strategies.kv.APE_TEMPERATURE)
    kv_temperature: Optional[float] = None
    kv_scale: float = 1.0  # default APE attention scale of `kv` over its passages (1 = off)
    # routing: the strategy when a request names none, the router's rules, A/B experiments
    default_strategy: str = "auto"
    router_min_score: float = 0.25  # best retrieval score below this: `direct` ("no good hit")
    router_one_passage_gap: Optional[float] = None  # best hit leads the second by this much: answer from it alone
    router_probe: bool = False  # probe the model's confidence with and without context (one extra short prefill)
    experiments: Optional[Path] = None  # a TOML file of experiments (reloaded when it changes)
    router_classifier: Optional[Path] = None  # folder of the trained classifier; None = DATA_DIR/router
    # access (server.api.auth): admin key(s) for knowledge and configuration, optional client keys for chat
    admin_key: Optional[str] = None
    api_keys: Optional[str] = None  # comma-separated client keys
    keys_file: Optional[Path] = None  # JSON {"admin": [{"name", "key"}], "clients": [...]}
    log_level: str = "info"

    def __post_init__(self):
        from .engine.device import check_device, check_dtype  # names only: torch is not imported

        object.__setattr__(self, "device", check_device(self.device))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if self.tensor_parallel_size < 1:
            raise ValueError(f"KNOWMUX_TENSOR_PARALLEL_SIZE must be 1 or more, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"KNOWMUX_GPU_MEMORY_UTILIZATION must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_loras < 1 or self.max_lora_rank < 0:
            raise ValueError(f"KNOWMUX_MAX_LORAS must be 1 or more and KNOWMUX_MAX_LORA_RANK 0 or more, got "
                             f"{self.max_loras} and {self.max_lora_rank}")
        if self.kv_store_bytes < 0:
            raise ValueError(f"KNOWMUX_KV_STORE_BYTES must be 0 (no limit) or a positive size, got {self.kv_store_bytes}")
        if not 0.0 <= self.kv_recompute <= 1.0:  # also false for NaN
            raise ValueError(f"KNOWMUX_KV_RECOMPUTE must be a fraction between 0 and 1, got {self.kv_recompute}")
        if not 0 <= self.kv_link_tokens <= 4096:
            raise ValueError(f"KNOWMUX_KV_LINK_TOKENS must be between 0 and 4096, got {self.kv_link_tokens}")
        if self.kv_positions not in (None, "sequential", "parallel"):
            raise ValueError(f"KNOWMUX_KV_POSITIONS must be sequential or parallel, got {self.kv_positions!r}")
        for name, value in (("KV_TEMPERATURE", self.kv_temperature), ("KV_SCALE", self.kv_scale)):
            if value is not None and not 0.0 < value <= 2.0:
                raise ValueError(f"KNOWMUX_{name} must be in (0, 2], got {value}")
        if self.kv_positions == "parallel" and (self.kv_recompute or self.kv_link_tokens):
            raise ValueError("KNOWMUX_KV_POSITIONS=parallel cannot be combined with KNOWMUX_KV_RECOMPUTE or "
                             "KNOWMUX_KV_LINK_TOKENS (they recompute passages in sequence)")
        from .prompt import get_layout  # no model or torch import

        get_layout(self.prompt_layout)  # ValueError naming the layouts
        if self.default_temperature is not None and not 0.0 <= self.default_temperature <= 2.0:
            raise ValueError(f"KNOWMUX_DEFAULT_TEMPERATURE must be between 0 and 2, got {self.default_temperature}")
        if self.default_top_p is not None and not 0.0 < self.default_top_p <= 1.0:
            raise ValueError(f"KNOWMUX_DEFAULT_TOP_P must be in (0, 1], got {self.default_top_p}")
        from indexes.store import store_kind  # names only: no database is reached

        store_kind(self.store)  # ValueError naming the accepted forms
        from .ray_builds import check as check_builds

        problem = check_builds(self)
        if problem:
            raise ValueError(problem)
        if not self.job_lease_s > 0.0:
            raise ValueError(f"KNOWMUX_JOB_LEASE_S must be a positive number of seconds, got {self.job_lease_s}")
        if self.max_context is not None and self.max_context < 1:
            raise ValueError(f"KNOWMUX_MAX_CONTEXT must be a positive number of tokens, got {self.max_context}")

    @classmethod
    def from_env(cls, env: Optional[dict] = None, **overrides) -> "Settings":
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"KNOWMUX_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("data_dir", "experiments", "router_classifier", "keys_file"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        return cls(**values)


def _coerce(f: dataclasses.Field, raw: str):
    kind = str(f.type)
    if kind == "bool":
        if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ValueError(f"KNOWMUX_{f.name.upper()} must be a boolean (1/0, true/false), got {raw!r}")
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if "float" in kind:
        return float(raw)
    if "int" in kind:
        return int(raw)
    if "Path" in kind:
        return Path(raw)
    return raw
