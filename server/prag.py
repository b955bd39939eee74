"""Parametric RAG: building adapters (both engines) and serving them as row deltas (torch).

Building (a job, or ``knowmux ingest --build adapters``) takes documents in groups
(``build_group``, 8 by default): the served model writes every document's augmentation
at once (one engine batch, shared with live traffic), then the group's LoRAs are trained
together through a packed forward (``AdapterBuilds``): on the torch engine over the
served weights, in pieces run on the engine thread between serving steps (short pieces
while requests are live); on vllm over a float32 copy (server.prag_vllm). Each is saved
in peft's format (adapters.bank). Serving: the retrieved
documents' adapters are loaded (memory LRU in front of the bank), turned into
(A, (alpha/r) B) pairs and combined by concatenation, the exact sum of their deltas;
the engine applies them to the request's row only, so the base weights never change.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import copy
import json
import logging
import threading
import time
from typing import Optional

from adapters.augment import augment, deterministic
from adapters.bank import AdapterBank, AdapterError, LoraWeights, adapter_key
from adapters.recipe import Recipe
from adapters.train import LoraTrainer, training_sequences

from .engine.aio import generate_blocking
from .engine.lora import AdapterSet
from .engine.types import GenRequest, RowSpec, SamplingParams
from .fingerprint import model_fingerprint

log = logging.getLogger(__name__)


class StoredAdapters:
    """What the prag services of both engines share: the adapter bank, keyed by model
    fingerprint, recipe and document content, and the rule that a damaged adapter is
    removed and reported, never used. Subclasses set ``bank``, ``recipe``,
    ``fingerprint`` and ``shapes`` (projection -> (out, in) of the base model)."""

    bank: AdapterBank
    recipe: Recipe
    fingerprint: str
    shapes: dict

    def key(self, doc) -> str:
        return adapter_key(self.fingerprint, self.recipe.fingerprint(), doc.content_hash)

    def has(self, doc) -> bool:
        return self.bank.has(self.key(doc))

    def forget(self, doc) -> bool:
        return self.bank.remove(self.key(doc))

    def load(self, doc) -> LoraWeights:
        """The stored weights. When they fail their checks (checksum, base model, shapes)
        they are removed, so the document reads as missing (skipped or refused per
        on_missing) and its next build trains it afresh, and AdapterError is raised."""
        key = self.key(doc)
        try:
            return self.bank.load(key, doc.id, self.fingerprint, self.shapes)
        except AdapterError as e:
            log.warning("%s; removed: the next adapter build of the document trains it afresh", e)
            self.bank.remove(key)
            raise


class AdapterBuilds(StoredAdapters):
    """Building adapters, the same on both engines: the served model writes every document's
    augmentation of a group at once (one engine batch, shared with live traffic), then the
    group's LoRAs are trained together through a ``LlamaRunner``'s packed forward and each is
    saved in peft's format. Subclasses set ``engine``, ``prompts`` and ``build_group``, and
    give the trainer (``trainer()``), the runner it trains through (``train_runner``) and the
    tokens per training piece (``_train_tokens()``)."""

    TRAIN_TOKENS_IDLE = 1024
    _train_lock: threading.Lock
    train_runner: object

    def trainer(self) -> LoraTrainer:  # pragma: no cover - interface
        raise NotImplementedError

    def _train_tokens(self) -> int:
        return self.TRAIN_TOKENS_IDLE

    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.0) -> str:
        ids = self.prompts.plain([{"role": "user", "content": prompt}])
        req = GenRequest(f"augment-{time.monotonic_ns()}", [RowSpec(ids)],
                         SamplingParams(max_tokens=max_tokens, temperature=temperature), background=True)
        return generate_blocking(self.engine, req, timeout=600)[0]

    def _augment(self, doc):
        passage = f"{doc.title}\n{doc.text}" if doc.title else doc.text
        r = self.recipe
        if not r.model_augmentation:
            return deterministic(passage)
        return augment(passage, lambda p, n: self.generate(p, n, r.augment_temperature), r.max_new_tokens,
                       paper=r.prompt_format == "prag", retries=r.augment_retries)

    def build_documents(self, docs: list) -> list:
        """Build the adapters of a group of documents together. Per document: True (built
        now), False (already stored) or the exception that failed it (the others go on)."""
        results: list = [None] * len(docs)
        todo, keys = [], set()
        for i, doc in enumerate(docs):
            key = self.key(doc)
            if key in keys or self.bank.has(key):  # stored, or the same content earlier in the group
                results[i] = False
            else:
                todo.append(i)
                keys.add(key)
        if not todo:
            return results
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(len(todo), thread_name_prefix="knowmux-augment") as ex:
            futures = {i: ex.submit(self._augment, docs[i]) for i in todo}  # one engine batch
        augs = {}
        for i, fut in futures.items():
            try:
                augs[i] = fut.result()
            except Exception as e:
                results[i] = e
        t_aug = (time.perf_counter() - t0) / len(todo)  # wall time shared by the group
        if not augs:
            return results
        with self._train_lock:  # one trainer, one group at a time
            trainer = self.trainer()
            ok = list(augs)
            trained = trainer.train_many([training_sequences(augs[i], self.recipe) for i in ok], self.train_runner,
                                         self._train_tokens)
            for i, (weights, stats) in zip(ok, trained):
                doc = docs[i]
                try:
                    self.bank.save(self.key(doc), lambda folder, w=weights: trainer.save(folder, w),
                                   augs[i].to_json(), {
                                       "doc_id": doc.id, "model": self.fingerprint, "model_id": self.engine.model_id,
                                       "recipe": self.recipe.__dict__, "content_hash": doc.content_hash,
                                       "augment_s": round(t_aug, 3), "engine": self.engine.name,
                                       **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
                                       "built_at": time.time()})
                    results[i] = True
                except Exception as e:
                    results[i] = e
        return results

    def build_document(self, doc) -> bool:
        """Augment, train and store one document's adapter unless stored; True if built now."""
        result = self.build_documents([doc])[0]
        if isinstance(result, BaseException):
            raise result
        return result


class PragService(AdapterBuilds):
    # Tokens per training piece (one engine-thread call): short while requests are live,
    # so a build holds serving up for about a second at a time; long when idle.
    TRAIN_TOKENS_BUSY = 256

    def __init__(self, engine, prompts, bank: AdapterBank, recipe: Recipe, cache_size: int = 256,
                 build_group: int = 8):
        self.engine, self.prompts, self.bank, self.recipe = engine, prompts, bank, recipe
        self.build_group = max(1, build_group)
        self.runner = self.train_runner = engine.runner  # trains through the served weights
        self.fingerprint = model_fingerprint(self.runner, engine.model_id)
        r = self.runner
        self.shapes = {"gate_proj": (r.intermediate, r.hidden), "up_proj": (r.intermediate, r.hidden),
                       "down_proj": (r.hidden, r.intermediate)}
        self._trainer: Optional[LoraTrainer] = None
        self._train_lock = threading.Lock()
        self._cache: collections.OrderedDict[str, AdapterSet] = collections.OrderedDict()
        self._cache_size = cache_size

    # ---- building ---------------------------------------------------------------------
    def trainer(self) -> LoraTrainer:
        if self._trainer is None:
            def make() -> LoraTrainer:
                # The trainer needs the model's modules (peft wraps its projections and saves
                # adapters in its format) but trains through the engine's runner: its copy of
                # the modules shares the engine's frozen weights instead of holding a second
                # set (540 MB for SmolLM2).
                shared = {id(p): p for p in self.engine.hf_model.parameters()}
                model = copy.deepcopy(self.engine.hf_model, shared)
                return LoraTrainer(model, self.engine.tokenizer, self.recipe, self.fingerprint,
                                   run=lambda fn: self.engine.worker.call(fn, background=True).result())

            # copying the model's weights is torch work: on the engine's thread, so that the
            # build's thread grows no OpenMP team of its own (server.engine.compute)
            self._trainer = self.engine.run_compute(make)
        return self._trainer

    def _train_tokens(self) -> int:
        return self.TRAIN_TOKENS_BUSY if self.engine.worker.busy else self.TRAIN_TOKENS_IDLE

    # ---- serving ----------------------------------------------------------------------
    def adapter_set(self, doc) -> Optional[AdapterSet]:
        """The document's adapter as engine deltas; None when not built; AdapterError (after
        removing it) when the stored one is damaged (``load``)."""
        key = self.key(doc)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if not self.bank.has(key):
            return None
        w = self.load(doc)
        dev, dt = self.engine.runner.device, self.engine.runner.dtype  # stored float32, served in the compute dtype
        aset = AdapterSet({k: (a.to(dev, dt), (b * w.scale).to(dev, dt)) for k, (a, b) in w.deltas.items()},
                          name=doc.id)
        self._cache[key] = aset
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return aset

    def row_adapters(self, docs: list, scales: list[float]):
        """(the row's combined AdapterSet or None, how many applied, missing ids, corrupt ids):
        the exact sum of the documents' deltas (peft's ``cat``); damaged ones are reported."""
        sets, used, missing, corrupt = [], [], [], []
        for doc, s in zip(docs, scales):
            try:
                aset = self.adapter_set(doc)
            except AdapterError:  # damaged: removed by adapter_set, never used
                aset = None
                corrupt.append(doc.id)
            if aset is None:
                missing.append(doc.id)
            else:
                sets.append(aset)
                used.append(s)
        return (AdapterSet.combine(sets, used) if sets else None), len(sets), missing, corrupt

    def forget(self, doc) -> bool:
        self._cache.pop(self.key(doc), None)
        return super().forget(doc)

    def describe(self, doc) -> dict:
        key = self.key(doc)
        out = {"doc_id": doc.id, "key": key, "stored": self.bank.has(key), "recipe": self.recipe.name}
        if out["stored"]:
            folder = self.bank.folder(key)
            out["meta"] = self.bank.meta(key)
            out["augmentation"] = json.loads((folder / "augmentation.json").read_text())
            out["files"] = sorted(p.name for p in folder.iterdir())
        return out

