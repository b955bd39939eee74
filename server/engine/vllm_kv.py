"""KV injection on the vLLM engine: a V1 KV connector that writes a request's joined
passage caches into its paged blocks, and reads a span back out for builds.

The ``kv`` strategy lays a request out as [head][passage 1]..[passage k][question] and
joins the stored caches of head and passages, each passage's keys re-rotated to its
place (server.kv.service): one KV prefix for positions 0..n-1. On vLLM the request's
prompt is the whole token sequence; the engine registers the prefix under the request's
id (``JOBS``; the request's ``extra_args`` name it, as vLLM adds a suffix to request ids
it is given) and this connector does the rest:

- scheduler side: ``get_num_new_matched_tokens`` reports the prefix's tokens beyond the
  locally cached ones as external hits (any length, not only whole blocks), so vLLM
  allocates their slots and prefills only the question; ``build_connector_meta`` turns
  the request's block ids into the slots of the positions to write.
- worker side: ``start_load_kv`` (before the forward: vLLM marks the step as holding
  synchronous loads) writes each layer's keys and values into those slots with the
  attention backend's own cache-update op (``impl.do_kv_cache_update``), so the paged
  layout (CPU, FlashAttention, FlashInfer...) is the backend's business, not ours.

A load that raises reports the blocks it touched as failed; the connector is configured
with ``kv_load_failure_policy="recompute"``, so vLLM prefills them instead (the request
is answered from a full prefill of the passages, never from a half-written cache), and
the job records why (the response's ``knowmux.kv.engine_load``).

Builds run the other way: a request for [head][passage] with one output token, marked
as a ``Save`` job; after its forward (``wait_for_save``) the worker reads the passage's
slots out of every layer. Reading needs the paged layout, which no backend op exposes:
``PagedLayout`` finds it once by writing coordinate patterns (token, head, channel) into
the null block through the same cache-update op and reading where each value landed,
then checks a random round trip; a layout it cannot map (quantised caches) leaves builds
unavailable rather than guessed.

The jobs live in this process (``JOBS``): this needs vLLM's engine core in the process
(knowmux's ``LLMEngine`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and one GPU; with
tensor parallelism the worker side runs elsewhere and the engine does not offer ``kv``.
Injected requests carry a cache salt (``cache_salt``), so vLLM's own prefix cache never
hands their (approximate, joined) blocks to a request that did not ask for injection, nor
to one whose prefix holds the same leading tokens with other keys.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

try:  # vLLM imports this module by path (KVTransferConfig.kv_connector_module_path)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)
except ImportError:  # pragma: no cover - the engine refuses to start without vllm
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole = object, object, None

log = logging.getLogger(__name__)

CACHE_SALT = "knowmux-kv"  # vLLM prefix-cache namespace of injected requests


def cache_salt(prefix) -> str:
    """vLLM caches prompt blocks by their tokens and the tokens before them. In a
    sequential layout a block's keys depend on nothing else, so requests share the blocks
    of a common start. In the parallel one every key is shifted by an amount that depends
    on all the passages (server.kv.service.join): only the very same prefix may share."""
    if prefix.layout == "sequential":
        return f"{CACHE_SALT}-sequential"
    return f"{CACHE_SALT}-{prefix.layout}-" + hashlib.sha256(repr(tuple(prefix.ids)).encode()).hexdigest()[:24]
JOB_KEY = "knowmux_kv"  # SamplingParams.extra_args key naming a request's job (vLLM renames request ids)


@dataclass
class Load:
    """Write ``kv`` ([L, 2, Hkv, n, D], positions 0..n-1, keys rotated) before the request's prompt."""

    kv: torch.Tensor
    written: int = 0  # tokens written into vLLM's blocks (less than length: the rest came from its prefix cache)
    error: Optional[str] = None  # the load failed; vLLM recomputed those blocks

    @property
    def length(self) -> int:
        return self.kv.shape[3]


@dataclass
class Save:
    """Read positions [start, end) of every layer after the request's prefill."""

    start: int
    end: int
    done: threading.Event = field(default_factory=threading.Event)
    kv: Optional[torch.Tensor] = None  # [L, 2, Hkv, end - start, D] on the CPU
    error: Optional[str] = None


Job = Union[Load, Save]


class JobRegistry:
    """vLLM request id -> its Load or Save; the engine thread registers and forgets, vLLM's
    scheduler and worker (the same thread, inside ``step()``) read."""

    def __init__(self):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def register(self, rid: str, job: Job) -> Job:
        with self._lock:
            self._jobs[rid] = job
        return job

    def get(self, rid: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(rid)

    def forget(self, rid: str) -> None:
        with self._lock:
            self._jobs.pop(rid, None)

    def __len__(self) -> int:
        return len(self._jobs)


JOBS = JobRegistry()


class KnowmuxMeta(KVConnectorMetadata):
    def __init__(self):
        self.loads: list[tuple[Load, int, list[int]]] = []  # job, first position, slots
        self.saves: list[tuple[Save, list[int]]] = []


def _slots(block_ids: list[int], block_size: int, start: int, end: int) -> list[int]:
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


class KnowmuxConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._config = vllm_config
        self.block_size = vllm_config.cache_config.block_size
        self._load_from: dict[str, int] = {}  # scheduler: request id -> first position it loads
        self._saving: set[str] = set()  # scheduler: save jobs already planned
        self._keys: dict[str, str] = {}  # scheduler: vLLM's request id -> the job's key
        self._layers: Optional[list[tuple[int, object]]] = None  # worker: (layer index, attention layer)
        self._layout: Optional[PagedLayout] = None
        self._failed_blocks: set[int] = set()

    # ---- scheduler side ---------------------------------------------------------------
    def _job(self, request) -> Optional[Job]:
        key = self._keys.get(request.request_id)
        if key is None:
            args = getattr(request.sampling_params, "extra_args", None) or {}
            key = args.get(JOB_KEY)
            if key is None:
                return None
            self._keys[request.request_id] = key
        return JOBS.get(key)

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        job = self._job(request)
        if not isinstance(job, Load) or job.error is not None:
            return 0, False
        return max(job.length - num_computed_tokens, 0), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        job = self._job(request)
        if num_external_tokens > 0 and isinstance(job, Load):
            self._load_from[request.request_id] = job.length - num_external_tokens

    def build_connector_meta(self, scheduler_output):
        meta = KnowmuxMeta()
        for new in scheduler_output.scheduled_new_reqs:
            self._plan(meta, new.req_id, new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):  # a request resumed after preemption loads again
            if rid in cached.resumed_req_ids and cached.new_block_ids[i] is not None:
                self._plan(meta, rid, cached.new_block_ids[i][0])
        self._load_from.clear()
        return meta

    def _plan(self, meta: KnowmuxMeta, rid: str, block_ids: list[int]) -> None:
        key = self._keys.get(rid)
        job = JOBS.get(key) if key is not None else None
        if isinstance(job, Load) and rid in self._load_from:
            start = self._load_from.pop(rid)
            meta.loads.append((job, start, _slots(block_ids, self.block_size, start, job.length)))
        elif isinstance(job, Save) and rid not in self._saving:
            self._saving.add(rid)
            meta.saves.append((job, _slots(block_ids, self.block_size, job.start, job.end)))

    def request_finished(self, request, block_ids):
        self._keys.pop(request.request_id, None)
        self._saving.discard(request.request_id)
        self._load_from.pop(request.request_id, None)
        return False, None

    # ---- worker side ------------------------------------------------------------------
    def _bind(self, forward_context) -> None:
        if self._layers is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layers = sorted((extract_layer_index(name), layer)
                                  for name, layer in forward_context.no_compile_layers.items()
                                  if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl"))

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        self._bind(forward_context)
        for job, start, slots in getattr(meta, "loads", ()):
            try:
                _write(self._layers, job.kv, start, slots)
                job.written = len(slots)
            except Exception as exc:  # vLLM recomputes these blocks (kv_load_failure_policy)
                log.warning("kv load failed; the passages are prefilled instead: %s", exc)
                job.error = f"{type(exc).__name__}: {exc}"
                self._failed_blocks.update(s // self.block_size for s in slots)

    def wait_for_layer_load(self, layer_name):
        return  # loads are written before the forward

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return  # saves are read after the forward, in wait_for_save

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        for job, slots in getattr(self._get_connector_metadata(), "saves", ()):
            try:
                if self._layout is None:
                    self._layout = PagedLayout.find(self._layers, self.block_size,
                                                    self._config.cache_config.num_gpu_blocks)
                job.kv = self._layout.read(self._layers, slots)
            except Exception as exc:
                log.warning("reading a KV span out of vLLM's cache failed: %s", exc)
                job.error = f"{type(exc).__name__}: {exc}"
            finally:
                job.done.set()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed


def _write(layers, kv: torch.Tensor, start: int, slots: list[int]) -> None:
    """Positions start..start+len(slots)-1 of ``kv`` into ``slots`` of every layer, in the
    model's dtype as the forward hands keys and values to the op (which quantises them for
    an fp8 cache itself)."""
    if not slots:
        return
    n, device = len(slots), layers[0][1].kv_cache.device
    target = torch.tensor(slots, dtype=torch.long, device=device)
    for index, layer in layers:
        span = kv[index, :, :, start:start + n].to(device)  # [2, Hkv, n, D]
        k, v = span[0].transpose(0, 1).contiguous(), span[1].transpose(0, 1).contiguous()  # [n, Hkv, D]
        layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, target)


class PagedLayout:
    """Where the backend's cache-update op puts K[t, h, d] and V[t, h, d] of a block's
    token t: per-block flat offsets, found by writing patterns into the null block."""

    def __init__(self, block_dim: int, k_index: torch.Tensor, v_index: torch.Tensor, block_size: int):
        self.block_dim, self.block_size = block_dim, block_size
        self.k_index, self.v_index = k_index, v_index  # [block_size, Hkv, D] flat offsets within a block

    @classmethod
    def find(cls, layers, block_size: int, num_blocks: Optional[int]) -> "PagedLayout":
        _, layer = layers[0]
        cache = layer.kv_cache
        dims = [i for i, s in enumerate(cache.shape) if s == num_blocks]
        if len(dims) != 1:
            raise RuntimeError(f"no single block axis of {num_blocks} in the KV cache's shape {list(cache.shape)}")
        bdim = dims[0]
        null = torch.arange(block_size, device=cache.device)  # the slots of block 0, vLLM's null block
        h, d = layer.num_kv_heads, layer.head_size
        grid = torch.meshgrid(torch.arange(block_size), torch.arange(h), torch.arange(d), indexing="ij")
        zero = torch.zeros(block_size, h, d, dtype=cache.dtype, device=cache.device)

        def written(k, v) -> torch.Tensor:
            layer.impl.do_kv_cache_update(layer, k, v, cache, null)
            return cache.select(bdim, 0).reshape(-1).float().cpu().clone()  # a copy: float() of float32 is a view

        base = written(zero, zero)
        index = []
        for which in (0, 1):
            ones = torch.ones_like(zero)
            mark = written(*((ones, zero) if which == 0 else (zero, ones))) != base
            codes = []
            for axis in grid:  # token, head, channel (each < 256: exact in every float dtype)
                pattern = axis.to(device=cache.device, dtype=cache.dtype)
                codes.append(written(*((pattern, zero) if which == 0 else (zero, pattern)))[mark].long())
            flat = mark.nonzero().flatten()
            code = (codes[0] * h + codes[1]) * d + codes[2]
            if flat.numel() != block_size * h * d or torch.bincount(code, minlength=flat.numel()).ne(1).any():
                raise RuntimeError(f"the KV cache layout is not a permutation of a block's keys and values "
                                   f"({'keys' if which == 0 else 'values'}: {flat.numel()} positions changed, "
                                   f"{block_size}x{h}x{d} written)")
            out = torch.empty_like(flat)
            out[code] = flat
            index.append(out.view(block_size, h, d))
        layout = cls(bdim, index[0], index[1], block_size)
        k = torch.randn(block_size, h, d).to(device=cache.device, dtype=cache.dtype)
        v = torch.randn(block_size, h, d).to(device=cache.device, dtype=cache.dtype)
        layer.impl.do_kv_cache_update(layer, k, v, cache, null)
        got = layout.read([(0, layer)], list(range(block_size)))
        written(zero, zero)
        if not (torch.equal(got[0, 0].transpose(0, 1), k.cpu()) and torch.equal(got[0, 1].transpose(0, 1), v.cpu())):
            raise RuntimeError("the KV cache layout did not read back what was written")
        return layout

    def read(self, layers, slots: list[int]) -> torch.Tensor:
        """[L, 2, Hkv, len(slots), D] on the CPU, the slots' keys and values of every layer."""
        blocks = [s // self.block_size for s in slots]
        offsets = torch.tensor([s % self.block_size for s in slots])
        out = []
        for _, layer in layers:
            cache = layer.kv_cache
            parts = []
            for b in sorted(set(blocks), key=blocks.index):
                rows = offsets[[i for i, x in enumerate(blocks) if x == b]]
                flat = cache.select(self.block_dim, b).reshape(-1).cpu()
                parts.append(torch.stack([flat[self.k_index[rows]], flat[self.v_index[rows]]]))  # [2, m, Hkv, D]
            out.append(torch.cat(parts, dim=1).transpose(1, 2))  # [2, Hkv, n, D]
        return torch.stack(out)
