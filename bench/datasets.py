"""Evaluation data in one shape: a corpus, questions and/or conflicts.

Loaders for the sets in ../shared/data (``--data-root``) and for the generic format:
- corpus:    {"id": str, "title": str (optional), "text": str}
- questions: {"id": str, "question": str, "answers": [str], "gold_doc_ids": [str] (optional)}
- conflicts: {"id": str, "question": str, "context": str, "context_answers": [str], "memory_answers": [str]}
A missing or malformed file raises DatasetError with a one-line reason.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

BUNDLED = Path(__file__).parent / "data"


class DatasetError(ValueError):
    pass


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    gold_doc_ids: list[str] = field(default_factory=list)


@dataclass
class Conflict:
    id: str
    question: str
    context: str
    context_answers: list[str]
    memory_answers: list[str]

    @property
    def doc_id(self) -> str:
        return f"conflict-{self.id}"


@dataclass
class Dataset:
    name: str
    corpus: list[dict] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    licence: str = ""


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _json(path: Path):
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e.msg})") from None


def _need(row: dict, key: str, where: str, kind=str):
    v = row.get(key)
    if not isinstance(v, kind) or (kind is str and not v.strip()):
        raise DatasetError(f"{where}: field {key!r} missing or not a {kind.__name__}")
    return v


def _text_id(prefix: str, title: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256((title + chr(0) + text).encode()).hexdigest()[:12]}"


# ---- generic ---------------------------------------------------------------------
def load_generic(corpus: Optional[Path], questions: Optional[Path], conflicts: Optional[Path]) -> Dataset:
    ds = Dataset("custom")
    if corpus:
        for i, r in enumerate(_jsonl(corpus), 1):
            ds.corpus.append({"id": str(_need(r, "id", f"{corpus}:{i}")), "title": r.get("title") or "",
                              "text": _need(r, "text", f"{corpus}:{i}")})
    if questions:
        for i, r in enumerate(_jsonl(questions), 1):
            w = f"{questions}:{i}"
            ds.questions.append(Question(str(_need(r, "id", w)), _need(r, "question", w), _need(r, "answers", w, list),
                                         list(r.get("gold_doc_ids") or [])))
    if conflicts:
        for i, r in enumerate(_jsonl(conflicts), 1):
            w = f"{conflicts}:{i}"
            ds.conflicts.append(Conflict(str(_need(r, "id", w)), _need(r, "question", w), _need(r, "context", w),
                                         _need(r, "context_answers", w, list), _need(r, "memory_answers", w, list)))
    return ds


# ---- the shared sets -----------------------------------------------------------------
def nq_open_oracle(root: Path) -> Dataset:
    ds = Dataset("nq_open_oracle", licence="NQ CC BY-SA 3.0 (repo MIT)")
    seen: set[str] = set()
    for i, r in enumerate(_jsonl(root / "nq_open_oracle" / "nq-open-oracle.first2000.jsonl")):
        ctx = r["ctxs"][0]
        did = _text_id("nq", ctx["title"], ctx["text"])
        if did not in seen:
            seen.add(did)
            ds.corpus.append({"id": did, "title": ctx["title"], "text": ctx["text"]})
        ds.questions.append(Question(f"nq-q{i:04d}", r["question"], r["answers"], [did]))
    return ds


def nq_open_sample(root: Path) -> Dataset:
    """The 200-record sample shipped in bench/data (runs without ../shared)."""
    d = BUNDLED / "nq_open_sample"
    ds = load_generic(d / "corpus.jsonl", d / "questions.jsonl", None)
    ds.name, ds.licence = "nq_open_sample", "NQ CC BY-SA 3.0 (repo MIT)"
    return ds


def hotpotqa_train100(root: Path) -> Dataset:
    d = root / "hotpotqa_train100"
    ds = Dataset("hotpotqa_train100", licence="HotpotQA CC BY-SA 4.0 (repo Apache-2.0)")
    for title, sents in _json(d / "train_corpus.json").items():
        ds.corpus.append({"id": title, "title": title, "text": "".join(sents).strip()})
    for r in _json(d / "qa_train.json"):
        gold = sorted({t for t, _ in r["supporting_facts"]})
        ds.questions.append(Question(r["_id"], r["question"], [r["answer"]], gold))
    return ds


def musique_train100(root: Path) -> Dataset:
    d = root / "musique_train100"
    ds = Dataset("musique_train100", licence="MuSiQue CC BY 4.0 (repo Apache-2.0)")
    for c in _json(d / "train_corpus.json"):
        ds.corpus.append({"id": _text_id("mq", c["title"], c["text"]), "title": c["title"], "text": c["text"]})
    for r in _json(d / "qa_train.json"):
        gold = [_text_id("mq", p["title"], p["paragraph_text"]) for p in r["paragraphs"] if p["is_supporting"]]
        ds.questions.append(Question(r["id"], r["question"], [r["answer"], *r.get("answer_aliases", [])], gold))
    return ds


def rgb_en_fact(root: Path) -> Dataset:
    """Counterfactual robustness: `positive_wrong` passages as context, `answer` as the
    memory answer, `fakeanswer` as the context answer. CC BY-NC-SA 4.0: evaluation only."""
    ds = Dataset("rgb_en_fact", licence="CC BY-NC-SA 4.0 (non-commercial, evaluation only)")
    for r in _jsonl(root / "rgb_en_fact" / "en_fact.jsonl"):
        mem = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
        fake = r["fakeanswer"] if isinstance(r["fakeanswer"], list) else [r["fakeanswer"]]
        ds.conflicts.append(Conflict(str(r["id"]), r["query"], "\n".join(r["positive_wrong"]), fake,
                                     [str(m) for m in mem]))
    return ds


def conflictqa_strategyqa(root: Path) -> Dataset:
    """Yes/no questions; the context is the evidence for the answer opposite to the
    eliciting model's own (`counter_memory`). Answers are scored as yes/no words."""
    ds = Dataset("conflictqa_strategyqa", licence="Apache-2.0 (repo)")
    for i, r in enumerate(_jsonl(root / "conflictqa_strategyqa" / "conflictQA-strategyQA-chatgpt.jsonl")):
        memory_says_no = " not " in f" {r['memory_answer'].lower()} "
        mem, ctx = (["no"], ["yes"]) if memory_says_no else (["yes"], ["no"])
        ds.conflicts.append(Conflict(f"cqa-{i}", r["question"] + " Answer yes or no.", r["counter_memory"], ctx, mem))
    return ds


def memotrap(root: Path) -> Dataset:
    """Memory vs instruction: the instructed ending is the "context" answer, the famous
    one the memory answer; the instruction is part of the question, there is no passage."""
    ds = Dataset("memotrap", licence="CC BY 4.0 (repo MIT)")
    for i, r in enumerate(_jsonl(root / "memotrap" / "memo-trap_classification.jsonl")):
        classes = [c.strip(" .") for c in ast.literal_eval(r["classes"])]
        right = classes[r["answer_index"]]
        famous = classes[1 - r["answer_index"]]
        ds.conflicts.append(Conflict(f"memo-{i}", r["prompt"], "", [right], [famous]))
    return ds


def distractors_2wiki(root: Path) -> list[dict]:
    rows = _json(root / "2wikimultihopqa_sample" / "2wikimultihopqa_corpus.json")
    return [{"id": _text_id("2w", r["title"], r["text"]), "title": r["title"], "text": r["text"]} for r in rows]


LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "nq_open_oracle": nq_open_oracle, "nq_open_sample": nq_open_sample, "hotpotqa_train100": hotpotqa_train100,
    "musique_train100": musique_train100, "rgb_en_fact": rgb_en_fact,
    "conflictqa_strategyqa": conflictqa_strategyqa, "memotrap": memotrap,
}
DISTRACTORS = {"2wikimultihopqa_sample": distractors_2wiki}


def load(name: str, root: Path) -> Dataset:
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    try:
        return LOADERS[name](root)
    except (KeyError, TypeError, IndexError, ValueError, SyntaxError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{name}: malformed record under {root} ({type(e).__name__}: {e})") from None
