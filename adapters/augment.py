"""Per-document augmentation, written by the served model (Parametric RAG's prompts).

The model writes one rewrite of the passage and three question-answer pairs. A small
model's QA output often fails to parse; missing pairs are filled with deterministic
cloze pairs cut from the passage's own sentences, and the record says how many pairs
came from the model.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

log = logging.getLogger(__name__)

Generate = Callable[[str, int], str]  # (user prompt, max new tokens) -> the model's answer

REWRITE_PROMPT = (
    "Rewrite the following passage. While keeping the entities, proper nouns, and key details such as names, "
    "locations, and terminology intact, create a new version of the text that expresses the same ideas in a "
    "different way. Make sure the revised passage is distinct from the original one, but preserves the core "
    "meaning and relevant information.\n{passage}"
)
QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based on the content "
    "of this passage. Each question should be answerable using the information provided in the passage. "
    "Additionally, please provide an appropriate answer for each question derived from the passage.\n"
    "You need to generate the question and answer in the following format:\n"
    '[\n    {{"question": "What is the capital of France?", "answer": "Paris"}},\n'
    '    {{"question": "...", "answer": "..."}}\n]\n\n'
    "This list should have at least three elements. You only need to output this list in the above format.\n"
    "Passage:\n{passage}"
)
# the paper's own QA prompt (with the full_answer field its parser requires)
PRAG_QA_PROMPT = (
    "I will provide a passage of text, and you need to generate three different questions based on the content "
    "of this passage. Each question should be answerable using the information provided in the passage. "
    "Additionally, please provide an appropriate answer for each question derived from the passage.\n"
    "You need to generate the question and answer in the following format:\n"
    '[\n    {{\n        "question": "What is the capital of France?",\n        "answer": "Paris"\n'
    '        "full_answer": "The capital of France is Paris."\n    }}, \n]\n\n'
    "This list should have at least three elements. You only need to output this list in the above format.\n"
    "Passage:\n{passage}"
)
_PAIR = re.compile(r'"question"\s*:\s*"((?:[^"\\]|\\.)+)"\s*,\s*"answer"\s*:\s*"((?:[^"\\]|\\.)+)"', re.S)


@dataclass
class Augmentation:
    passage: str
    rewrite: str
    qa: list[dict] = field(default_factory=list)  # [{"question", "answer", "source": "model" | "cloze"}]
    qa_attempts: int = 0  # QA lists the model wrote (0: none asked)

    def to_json(self) -> dict:
        return asdict(self)


def parse_qa(text: str) -> list[dict]:
    """QA pairs from the model's output: a JSON list if it parses, else every
    "question": ..., "answer": ... pair the text contains."""
    try:
        start, end = text.index("["), text.rindex("]") + 1
        items = json.loads(text[start:end])
        pairs = [{"question": str(i["question"]).strip(), "answer": str(i["answer"]).strip()}
                 for i in items if isinstance(i, dict) and i.get("question") and i.get("answer")]
        if pairs:
            return pairs
    except (ValueError, KeyError, TypeError):
        pass
    return [{"question": q.strip(), "answer": a.strip()} for q, a in _PAIR.findall(text)]


def parse_qa_strict(text: str) -> list[dict]:
    """The paper's parser (its fix_json for Llama-3-8B, then fix_qa): the text from its
    first "[" to its first "]" is a JSON list of at least three objects, each with
    question, answer and full_answer; else nothing."""
    if "[" in text:
        text = text[text.index("["):]
    if "]" in text:
        text = text[:text.index("]") + 1]
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or len(items) < 3:
        return []
    out = []
    for item in items[:3]:
        if not isinstance(item, dict) or not all(k in item for k in ("question", "answer", "full_answer")):
            return []
        answer = item["answer"]
        answer = ", ".join(map(str, answer)) if isinstance(answer, list) else "Unknown" if answer is None else str(answer)
        out.append({"question": str(item["question"]).strip(), "answer": answer.strip(),
                    "full_answer": str(item["full_answer"]).strip()})
    return out


def cloze_pairs(passage: str, n: int) -> list[dict]:
    """Deterministic pairs: a sentence's first part asks for the rest. Sentences are cut
    at the middle first, then at a third and two thirds: up to n distinct pairs."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", passage.strip()) if len(s.split()) >= 4]
    out: list[dict] = []
    for frac in (1 / 2, 1 / 3, 2 / 3):
        for words in sentences:
            if len(out) == n:
                return out
            cut = min(max(2, round(len(words) * frac)), len(words) - 1)
            pair = {"question": f"Complete the sentence: {' '.join(words[:cut])} ...",
                    "answer": " ".join(words[cut:]), "source": "cloze"}
            if pair not in out:
                out.append(pair)
    return out


def augment(passage: str, generate: Generate, max_new_tokens: int = 256, paper: bool = False,
            retries: int = 0, parallel: int = 8) -> Augmentation:
    """The model's rewrite and QA pairs of the passage (cloze pairs where fewer than three
    QA pairs parse). The two are requested at once, so that a batching engine decodes them
    in one batch (with the other documents of a build group). ``paper``: the paper's QA
    prompt and strict parser; ``retries``: the QA list asked again while it fails to give
    three pairs (useful when ``generate`` samples). The retries are asked ``parallel`` at a
    time, so a batching engine decodes them together, and the first that parses in the
    order asked is kept: the same draw as asking one at a time (the samples are
    independent), in a fraction of the wall time; ``qa_attempts`` counts up to that one."""
    qa_prompt, parse = (PRAG_QA_PROMPT, parse_qa_strict) if paper else (QA_PROMPT, parse_qa)
    with cf.ThreadPoolExecutor(2, thread_name_prefix="knowmux-augment-gen") as ex:
        rewrite_f = ex.submit(generate, REWRITE_PROMPT.format(passage=passage), max_new_tokens)
        qa_f = ex.submit(generate, qa_prompt.format(passage=passage), max_new_tokens)
        rewrite, qa = rewrite_f.result().strip() or passage, parse(qa_f.result())
    attempts = 1
    while len(qa) < 3 and attempts <= retries:
        k = max(1, min(parallel, retries + 1 - attempts))
        with cf.ThreadPoolExecutor(k, thread_name_prefix="knowmux-augment-retry") as ex:
            outs = [ex.submit(generate, qa_prompt.format(passage=passage), max_new_tokens) for _ in range(k)]
            for out in outs:  # in the order asked
                qa, attempts = parse(out.result()), attempts + 1
                if len(qa) >= 3:
                    break
    if retries:
        log.info("QA list %s after %d of at most %d asks", "parsed" if len(qa) >= 3 else "not parsed",
                 attempts, retries + 1)
    qa = [{**p, "source": "model"} for p in qa][:3]
    if len(qa) < 3:
        qa += cloze_pairs(passage, 3 - len(qa))
    return Augmentation(passage, rewrite, qa, qa_attempts=attempts)


def deterministic(passage: str) -> Augmentation:
    """No model writing: the passage as its own rewrite, cloze pairs only."""
    return Augmentation(passage, passage, cloze_pairs(passage, 3))
