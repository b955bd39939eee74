"""The PyTorch engine: a transformers causal LM driven by our own step loop."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from . import KV_INJECTION, LOGITS_HOOK, ROW_ADAPTERS
from .compute import ComputeThread
from .device import dtype_name, folder_dtype, resolve_device, resolve_dtype
from .model import LlamaRunner
from .types import GenRequest, Sink, WorkerLimits
from .sequence import Handle
from .worker import EngineWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


class TorchEngine:
    name = "torch"
    capabilities = frozenset({LOGITS_HOOK, KV_INJECTION, ROW_ADAPTERS})

    def __init__(self, hf_model, tokenizer, model_id: str, limits: WorkerLimits = WorkerLimits(),
                 on_step: Optional[Callable[[int, int, float], None]] = None,
                 compute: Optional[ComputeThread] = None):
        self.compute = compute  # the thread that built the model and will step it (None: the worker's own)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.hf_model = hf_model.eval()
        self.generation_config = getattr(hf_model, "generation_config", None)  # the model's sampling defaults
        self.runner = LlamaRunner(self.hf_model)
        self.device, self.dtype = str(self.runner.device), dtype_name(self.runner.dtype)
        self.max_context = self.runner.max_positions
        eos = set()
        for src in (tokenizer.eos_token_id, getattr(hf_model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos_ids = eos
        self.worker = EngineWorker(self.runner, tokenizer, eos, limits, on_step)

    @classmethod
    def from_folder(cls, path: Path, limits: WorkerLimits = WorkerLimits(), threads: Optional[int] = None,
                    on_step=None, device: str = "auto", dtype: str = "auto") -> "TorchEngine":
        """The model of a local folder on ``device`` (auto, cpu, cuda, cuda:N) in ``dtype``
        (auto, float32, bfloat16, float16): server.engine.device says what auto picks."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, folder_dtype(path))

        def build() -> "TorchEngine":
            torch.set_num_threads(threads or os.cpu_count() or 1)
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev)
            return cls(model, tok, model_id=Path(path).name, limits=limits, on_step=on_step, compute=compute)

        compute = ComputeThread()  # loads, tunes and later steps the model: one OpenMP team
        try:
            return compute.run(build)
        except BaseException:
            compute.close()
            raise

    def run_compute(self, fn: Callable[[], T], background: bool = False) -> T:
        """``fn()`` on the engine's thread (see server.engine.compute), for torch work outside
        the engine's steps: between two steps once the engine runs (at once when called
        from the engine thread), before that on the compute thread, if there is one.
        ``background`` work (a build job's pieces) yields to live requests (worker.call)."""
        if self.worker.started:
            return fn() if self.worker.on_engine_thread() else self.worker.call(fn, background).result()
        return self.compute.run(fn) if self.compute is not None else fn()

    def observe_steps(self, callback: Callable[[int, int, float], None]) -> None:
        """callback(tokens, rows, seconds) after every forward step (for metrics)."""
        self.worker.on_step = callback

    def start(self) -> None:
        self.worker.start(on=self.compute)

    def shutdown(self) -> None:
        self.worker.shutdown()
        if self.compute is not None:
            self.compute.close(wait=5.0)

    def submit(self, req: GenRequest, sink: Sink) -> Handle:
        return self.worker.submit(req, sink)

    def stats(self) -> dict:
        return self.worker.stats()

    def info(self) -> dict:
        """Where and in what precision the model runs, and its KV pool (for /health, /v1/models)."""
        pool = self.worker.kv_pool
        return {"device": self.device, "dtype": self.dtype,
                "kv_pool": {"slots": pool.kv.shape[2], "row_tokens": pool.row_tokens, "dtype": self.dtype,
                            "bytes": pool.kv.numel() * pool.kv.element_size()} if pool is not None else None}

    @property
    def alive(self) -> bool:
        return self.worker.alive

    def health(self) -> tuple[bool, str]:
        """(ok, reason). A failed step leaves the engine serving (ok, with the last error
        as the reason); a dead engine thread is not ok."""
        if not self.worker.alive:
            return False, self.worker.last_error or "the engine is not running"
        return True, f"ok (last error: {self.worker.last_error})" if self.worker.last_error else "ok"
