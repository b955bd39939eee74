"""Parametric RAG on the torch engine: building adapters and serving them as row deltas.

Building (a job, or ``knowmux ingest --build adapters``): the served model writes the
augmentation through the engine (batched with live traffic), then a LoRA is trained on
a private copy of the model, each optimiser step run on the engine thread between
serving steps, and saved in peft's format (adapters.bank). Serving: the retrieved
documents' adapters are loaded (memory LRU in front of the bank), turned into
(A, (alpha/r) B) pairs and combined by concatenation, the exact sum of their deltas;
the engine applies them to the request's row only, so the base weights never change.
"""

from __future__ import annotations

import collections
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
from .kv.service import model_fingerprint

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


class PragService(StoredAdapters):
    def __init__(self, engine, prompts, bank: AdapterBank, recipe: Recipe, cache_size: int = 256):
        self.engine, self.prompts, self.bank, self.recipe = engine, prompts, bank, recipe
        self.runner = engine.runner
        self.fingerprint = model_fingerprint(self.runner, engine.model_id)
        r = self.runner
        self.shapes = {"gate_proj": (r.intermediate, r.hidden), "up_proj": (r.intermediate, r.hidden),
                       "down_proj": (r.hidden, r.intermediate)}
        self._trainer: Optional[LoraTrainer] = None
        self._train_lock = threading.Lock()
        self._cache: collections.OrderedDict[str, AdapterSet] = collections.OrderedDict()
        self._cache_size = cache_size

    # ---- building ---------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int) -> str:
        ids = self.prompts.plain([{"role": "user", "content": prompt}])
        req = GenRequest(f"augment-{time.monotonic_ns()}", [RowSpec(ids)], SamplingParams(max_tokens=max_tokens))
        return generate_blocking(self.engine, req, timeout=600)[0]

    def trainer(self) -> LoraTrainer:
        if self._trainer is None:
            model = copy.deepcopy(self.engine.hf_model)
            for p in model.parameters():  # the served copy holds views of the engine's fused weights
                p.data = p.data.contiguous()
            self._trainer = LoraTrainer(model, self.engine.tokenizer, self.recipe, self.fingerprint,
                                        run=lambda fn: self.engine.worker.call(fn, background=True).result())
        return self._trainer

    def build_document(self, doc) -> bool:
        """Augment, train and store one document's adapter unless stored; True if built now."""
        key = self.key(doc)
        if self.bank.has(key):
            return False
        t0 = time.perf_counter()
        passage = f"{doc.title}\n{doc.text}" if doc.title else doc.text
        aug = augment(passage, self.generate, self.recipe.max_new_tokens) if self.recipe.model_augmentation \
            else deterministic(passage)
        t_aug = time.perf_counter() - t0
        with self._train_lock:  # one trainer, one document at a time
            trainer = self.trainer()
            stats = trainer.train(training_sequences(aug, self.recipe))
            self.bank.save(key, trainer.save, aug.to_json(), {
                "doc_id": doc.id, "model": self.fingerprint, "model_id": self.engine.model_id,
                "recipe": self.recipe.__dict__, "content_hash": doc.content_hash, "augment_s": round(t_aug, 3),
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
                "built_at": time.time()})
        return True

    # ---- serving ------------------------------------------------------------------------
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
        aset = AdapterSet({k: (a, b * w.scale) for k, (a, b) in w.deltas.items()}, name=doc.id)
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

