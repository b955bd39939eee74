"""`auto`: choose a strategy per request, and say why in one short phrase.

In order, the first that applies decides:

1. no documents ingested                      -> direct
2. the best hit scores below ``min_score``      -> direct ("no good hit")
3. candidates = strategies this engine runs whose artefacts exist for every retrieved
   document (kv: stored caches; prag: trained adapters), and, with
   ``X-Latency-Budget-Ms``, whose estimated time to first token fits the budget
   (none fits: the fastest)
4. probe on, and the context makes the model less sure of its first token
   (CK-PLUG confidence gain < 0: memory and context disagree) -> rag+ckplug
5. a trained classifier is loaded               -> its most probable candidate (a classifier
   whose out-of-fold accuracy does not beat its majority class is not loaded)
6. otherwise                                    -> the first candidate in ``PREFERENCE``
7. applied to the choice of 3, 5 or 6 when it reads the passages as they are (rag, kv):
   ``one_passage_gap`` (a setting, or calibrated by ``knowmux router train
   --one-passage-from``) set, and the best hit leads the second by at least that much
   -> the top passage alone: ``kv`` if its cache is stored (one injected passage gives
   exactly the logits of ``rag`` with that passage, at about ``direct``'s prefill),
   else ``rag`` with one passage. A choice to answer from memory (direct, prag) or to
   arbitrate a conflict (+ckplug) is never narrowed.

``PREFERENCE`` is the accuracy order measured on NQ-open (bench/RESULTS.md: rag 21%,
rag+ckplug 19%, kv 15%, direct 6% contains-match): with nothing else to go on, the most
accurate strategy that fits. Time-to-first-token estimates use the prefill rate the
engine has actually shown on recent requests (an exponential average), so the budget
rule adapts to the machine and its load.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..prompt import Passage
from ..strategies import get_strategy
from .classifier import ClassifierError, RouterClassifier
from .features import Features, question_words

log = logging.getLogger(__name__)

NARROWABLE = ("rag", "kv")  # choices rule 7 may narrow to the top passage (the trainer simulates the same)
PREFERENCE = ("rag", "rag+ckplug", "prag+rag", "kv", "kv+ckplug", "prag", "direct")
# fixed costs per retrieved document beyond prefill, ms (measured: KV disk load p50 10 ms;
# adapter combine a few ms): small next to prefill, but they order kv/prag against direct
_KV_LOAD_MS, _ADAPTER_MS, _TEMPLATE_TOKENS = 12.0, 5.0, 12


@dataclass(frozen=True)
class Decision:
    strategy: str
    reason: str
    rule: str  # which rule decided, a short fixed name (a metrics label)
    features: Optional[Features] = None
    hits: Optional[list] = None  # the retrieval done for routing, handed on to the strategy
    estimates_ms: Optional[dict] = None
    top_k: Optional[int] = None  # set when the router narrows the passages (rule 7)


# The one-passage rule (rule 7) at the gap measured for a model, used when neither the
# server's setting nor a trained classifier gives one. SmolLM2-135M-Instruct (the embedded
# default) answers best from one passage wherever it was measured (bench/RESULTS.md, "The
# router", "Fairly"): NQ-open held-out 35.0% at top-1 against 23.3% at top-3, with or without
# distractors; invented facts 70.0% against 67.5%; HotpotQA with 2Wiki distractors 20.0%
# against 22.0% (one question of 50). So `auto` answers from the top passage out of the box.
SHIPPED_ONE_PASSAGE_GAP = {"SmolLM2-135M-Instruct": 0.0}


class Router:
    def __init__(self, ctx, supported: list[str], *, min_score: float = 0.25, probe=None,
                 classifier_dir: Optional[Path] = None, prefill_tokens_per_s: float = 500.0,
                 one_passage_gap: Optional[float] = None, tier=None, model_id: Optional[str] = None):
        self.ctx = ctx  # strategies.StrategyContext: kb, prompts, kv, prag
        self.supported = [s for s in PREFERENCE if s in supported]
        self.min_score = min_score
        self._one_passage_setting = one_passage_gap  # None: resolved by _one_passage_gap_from
        self._model_id = model_id
        self.one_passage_gap, self.one_passage_source = self._one_passage_gap_from({})
        self.probe = probe  # callable(messages, passages) -> confidence gain, or None (off)
        self.classifier_dir = classifier_dir
        self.classifier: Optional[RouterClassifier] = None
        self.classifier_error: Optional[str] = None
        self.tier = tier  # the shared tier's router namespace (server.router.shared), or None
        self.classifier_source: Optional[str] = None  # "tier <digest>" when the tier's current one is loaded
        self._rate = prefill_tokens_per_s
        self._lock = threading.Lock()
        self.load_classifier()

    # ---- the classifier ------------------------------------------------------------------
    def load_classifier(self) -> None:
        if self.classifier_dir is None:
            return
        tier_error = None
        if self.tier is not None:  # every replica routes with the classifier published to the tier
            from .shared import fetch

            try:
                digest = fetch(self.tier, self.classifier_dir)
                self.classifier_source = f"tier {digest[:12]}" if digest else None
            except Exception as e:  # unreachable or damaged: keep the local one
                tier_error = f"router classifier from the tier {self.tier.url}: {type(e).__name__}: {e}"
                log.warning("%s; the local one is kept", tier_error)
        try:
            self.classifier, self.classifier_error = RouterClassifier.load(self.classifier_dir), None
        except ClassifierError as e:
            self.classifier, self.classifier_error = None, str(e)
            log.error("%s; routing by rules only", e)
        info = self.classifier.info if self.classifier is not None else {}
        # the trainer's calibration is a rule of its own, kept even if the classifier is not used
        self.one_passage_gap, self.one_passage_source = self._one_passage_gap_from(info)
        cv, majority = info.get("cv_label_accuracy"), info.get("majority_share")
        if isinstance(cv, (int, float)) and isinstance(majority, (int, float)) and cv <= majority:
            # always answering its most common label would do as well: it has learnt nothing to route by
            self.classifier, self.classifier_error = None, (
                f"router classifier in {self.classifier_dir}: out-of-fold label accuracy {cv:.2f} does not beat "
                f"its majority class ({majority:.2f}); not used (retrain it on more questions)")
            log.warning("%s; routing by rules only", self.classifier_error)
        if self.classifier is not None:
            log.info("router classifier loaded: classes %s", ", ".join(self.classifier.classes))
        if tier_error:
            self.classifier_error = "; ".join(e for e in (tier_error, self.classifier_error) if e)

    def _one_passage_gap_from(self, info: dict) -> tuple[Optional[float], Optional[str]]:
        """The one-passage rule's gap and where it came from: the server's setting, else the
        trained classifier's calibration on its data (``info``; None there: no gap won, the
        rule is off), else the gap measured for this model (SHIPPED_ONE_PASSAGE_GAP), else
        off (None, None)."""
        if self._one_passage_setting is not None:
            return self._one_passage_setting, "setting"
        if "one_passage_gap" in info:
            gap = info["one_passage_gap"]
            return (float(gap), "classifier") if isinstance(gap, (int, float)) else (None, None)
        gap = SHIPPED_ONE_PASSAGE_GAP.get(self._model_id or "")
        return (gap, f"measured for {self._model_id}") if gap is not None else (None, None)

    # ---- prefill rate ------------------------------------------------------------------
    def observe_prefill(self, tokens: int, ms: float) -> None:
        """Feed back a finished request's prefill (tokens actually computed, time)."""
        if tokens >= 16 and ms > 0:
            with self._lock:
                self._rate = 0.8 * self._rate + 0.2 * (tokens / (ms / 1e3))

    @property
    def prefill_rate(self) -> float:
        return self._rate

    # ---- features ----------------------------------------------------------------------
    def features(self, question: str, top_k: int, need_tokens: bool) -> tuple[Features, list, dict]:
        kb, ctx = self.ctx.kb, self.ctx
        emb = kb.embed_query(question)
        hits = kb.search_vector(emb, top_k)
        docs = kb.get_many([h.doc_id for h in hits])
        hits = [h for h in hits if h.doc_id in docs]
        f = Features(embedding=emb, scores=[h.score for h in hits], question_words=question_words(question))
        if need_tokens:
            f.question_tokens = ctx.prompts.count_tokens(question)
            f.passage_tokens = sum(len(ctx.prompts.passage_ids(Passage(d.id, d.title, d.text)))
                                   for d in (docs[h.doc_id] for h in hits))
        if ctx.kv is not None:
            f.with_kv = sum(ctx.kv.has(docs[h.doc_id]) for h in hits)
        if ctx.prag is not None:
            f.with_adapter = sum(ctx.prag.has(docs[h.doc_id]) for h in hits)
        return f, hits, docs

    def estimate_ttft_ms(self, f: Features) -> dict[str, float]:
        per_ms = self._rate / 1e3
        q = f.question_tokens + _TEMPLATE_TOKENS
        p = f.passage_tokens
        n = f.n_hits
        est = {"direct": q / per_ms, "rag": (q + p) / per_ms, "rag+ckplug": (2 * q + p) / per_ms,
               "kv": q / per_ms + _KV_LOAD_MS * n, "kv+ckplug": 2 * q / per_ms + _KV_LOAD_MS * n,
               "prag": 1.2 * q / per_ms + _ADAPTER_MS * n, "prag+rag": 1.2 * (q + p) / per_ms + _ADAPTER_MS * n}
        return {s: round(est[s], 1) for s in self.supported}

    # ---- the decision ------------------------------------------------------------------
    def route(self, messages: list[dict], question: str, top_k: int,
              budget_ms: Optional[float] = None) -> Decision:
        kb = self.ctx.kb
        if kb is None or kb.count() == 0:
            return Decision("direct", "no documents ingested", "no_documents")
        f, hits, docs = self.features(question, top_k, need_tokens=budget_ms is not None)
        if not hits or f.top_score < self.min_score:
            return Decision("direct", f"no good hit (top score {f.top_score:.2f} < {self.min_score:.2f})",
                            "no_good_hit", f, hits)
        candidates = [s for s in self.supported if self._has_artefacts(s, f)]
        est, excluded = None, []
        if budget_ms is not None:
            est = self.estimate_ttft_ms(f)
            fitting = [s for s in candidates if est[s] <= budget_ms]
            if not fitting:
                fastest = min(candidates, key=lambda s: est[s])
                return Decision(fastest, f"latency budget {budget_ms:g} ms: nothing fits, fastest is {fastest} "
                                         f"(est. {est[fastest]:.0f} ms)", "budget", f, hits, est)
            excluded = [s for s in candidates if s not in fitting]
            candidates = fitting
        if self.probe is not None and "rag+ckplug" in candidates:
            passages = [Passage(h.doc_id, docs[h.doc_id].title, docs[h.doc_id].text) for h in hits]
            f.confidence_gain = self.probe(messages, passages)
            if f.confidence_gain < 0:
                return Decision("rag+ckplug", f"context lowers confidence (gain {f.confidence_gain:.2f}): "
                                              "rag+ckplug", "probe", f, hits, est)
        return self._narrowed(self._choose(f, hits, est, candidates, excluded, budget_ms), docs, candidates)

    def _choose(self, f: Features, hits: list, est: Optional[dict], candidates: list[str], excluded: list[str],
                budget_ms: Optional[float]) -> Decision:
        """Rules 5 and 6 (and 3's budget when some strategies were excluded)."""
        clf = self.classifier  # one reference: a reload may swap it meanwhile
        if clf is not None:
            try:
                choice = clf.choose(f.vector(), candidates)
            except ClassifierError as e:  # e.g. a classifier trained with another embedder
                log.warning("router classifier not usable for this request: %s", e)
                choice = None
            floor = float(clf.info.get("min_confidence", 0.0))
            if choice is not None and choice[1] >= floor:
                s, p = choice
                return Decision(s, f"classifier: {s} (p={p:.2f})", "classifier", f, hits, est)
            if choice is not None:  # unsure: the calibrated threshold says the default is safer
                best = candidates[0]
                return Decision(best, f"classifier unsure ({choice[0]} p={choice[1]:.2f} < {floor:.2f}): {best}",
                                "classifier_unsure", f, hits, est)
        best = candidates[0]
        if excluded:
            return Decision(best, f"latency budget {budget_ms:g} ms: {best} (est. {est[best]:.0f} ms; "
                                  f"{excluded[0]} est. {est[excluded[0]]:.0f} ms)", "budget", f, hits, est)
        return Decision(best, f"good hit (top score {f.top_score:.2f}): {best}", "preference", f, hits, est)

    def _narrowed(self, d: Decision, docs: dict, candidates: list[str]) -> Decision:
        """Rule 7: a choice that reads the passages as they are (rag, kv) answers from the
        top passage alone when it leads the second by ``one_passage_gap``."""
        if d.strategy not in NARROWABLE:
            return d
        one = self._one_passage(d.features, d.hits, docs, candidates)
        if one is None:
            return d
        gap = d.features.scores[0] - d.features.scores[1]
        return Decision(one, f"{d.reason}; one passage suffices (lead {gap:.2f} >= {self.one_passage_gap:.2f}): "
                             f"{one} with the top passage", "one_passage", d.features, d.hits, d.estimates_ms,
                        top_k=1)

    def _one_passage(self, f: Features, hits: list, docs: dict, candidates: list[str]) -> Optional[str]:
        """The strategy that answers from the top passage alone (rule 7), or None."""
        if self.one_passage_gap is None or f.n_hits < 2 or f.scores[0] - f.scores[1] < self.one_passage_gap:
            return None
        if "kv" in self.supported and self.ctx.kv is not None and self.ctx.kv.has(docs[hits[0].doc_id]):
            return "kv"
        return "rag" if "rag" in candidates else None

    @staticmethod
    def _has_artefacts(strategy: str, f: Features) -> bool:
        """Whether every retrieved document has the stored artefacts ``strategy`` requires."""
        requires = get_strategy(strategy).requires
        return ("kv" not in requires or f.with_kv == f.n_hits) and \
            ("adapters" not in requires or f.with_adapter == f.n_hits)

    def describe(self) -> dict:
        c = self.classifier
        return {"rules": {"min_score": self.min_score, "probe": self.probe is not None,
                          "one_passage_gap": self.one_passage_gap, "one_passage_source": self.one_passage_source,
                          "preference": self.supported},
                "prefill_tokens_per_s": round(self._rate, 1),
                "classifier": None if c is None else {"classes": c.classes, "info": c.info,
                                                      "source": self.classifier_source or "local"},
                "classifier_error": self.classifier_error}
