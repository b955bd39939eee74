"""How a document becomes an adapter: every hyperparameter is a setting, with presets.

``paper``: Parametric RAG's recipe as its released code trains it (oneal2000/PRAG,
src/augment.py, src/encode.py, src/prompt_template.py): 1 rewrite + 3 QA pairs written by
the served model, sampled at temperature 0.7 (512 new tokens), the QA list asked again
(up to 100 times) until it parses with question, answer and full_answer; 5 training
sequences (QA1 and QA2 each with the passage and with the rewrite in the prompt, QA3
without a passage) in the paper's prompt ("You should answer the question by referring
to the knowledge provided below ...", "Passage 1: ...", "Question: ...?") with the target
"The answer is X." and the loss on every token of the sequence; LoRA on gate/up/down,
rank 2, alpha 32, dropout 0; AdamW lr 3e-4, batch 1, 1 epoch. Departures, each forced:
the paper's augmentation also samples from the top 50 tokens only (knowmux's sampler has
no top-k), and a passage whose QA never parses is skipped there, trained here on cloze
pairs (a document must get an adapter).
``paper-answer-loss``: what ``paper`` was before 2026-12-07: the same sizes and rates,
greedy augmentation, knowmux's prompt ("<passage>\n\nQuestion: ...") and the loss on
the answer tokens only.
``knowmux``: the default, chosen by measurement on the served model (bench/RESULTS.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

TARGET_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    name: str
    rank: int = 2
    alpha: float = 32.0
    lr: float = 3e-4
    epochs: int = 1
    model_augmentation: bool = True  # the served model writes 1 rewrite + 3 QA pairs
    passage_sequence: bool = False  # also train on the passage itself (plain LM loss)
    qa_sequences: bool = True  # the paper's 5 QA sequences
    qa_contexts: tuple[str, ...] = ("passage", "rewrite")  # QA1 and QA2 are trained with each of these in the prompt
    top_layers: float = 1.0  # share of the layers, from the top, that get adapters (the backward stops below them)
    max_new_tokens: int = 256  # for the model-written augmentation
    augment_temperature: float = 0.0  # sampling temperature of the augmentation (0: greedy)
    augment_retries: int = 0  # QA lists asked again while fewer than 3 pairs parse (then cloze pairs)
    prompt_format: str = "knowmux"  # knowmux: "<context>\n\nQuestion: q" -> answer; prag: the paper's prompt
    loss_on: str = "answer"  # answer: the target tokens only; sequence: every token (the paper's code)

    def fingerprint(self) -> str:
        d = asdict(self)
        for name, default in _ADDED_LATER.items():  # at their defaults: adapters stored before keep their keys
            if getattr(self, name) == default:
                d.pop(name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_ADDED_LATER = {"qa_contexts": ("passage", "rewrite"), "top_layers": 1.0, "augment_temperature": 0.0,
                "augment_retries": 0, "prompt_format": "knowmux", "loss_on": "answer"}

PRESETS = {
    "paper": Recipe("paper", max_new_tokens=512, augment_temperature=0.7, augment_retries=100,
                    prompt_format="prag", loss_on="sequence"),
    "paper-answer-loss": Recipe("paper-answer-loss"),
    # the reference run in the issue: passage as a 6th sequence, lr 1e-3, 4 epochs injected 6 of 8 facts
    "passage-4ep": Recipe("passage-4ep", lr=1e-3, epochs=4, passage_sequence=True),
    # no model writing (the slow part of a build): cloze pairs from the passage + the passage itself
    "cloze-4ep": Recipe("cloze-4ep", lr=1e-3, epochs=4, passage_sequence=True, model_augmentation=False),
    "cloze-4ep-lr3e-3": Recipe("cloze-4ep-lr3e-3", lr=3e-3, epochs=4, passage_sequence=True,
                               model_augmentation=False),
    # faster builds (the build-time goal is 10 s per document): half the epochs at a higher rate
    "passage-2ep-lr2e-3": Recipe("passage-2ep-lr2e-3", lr=2e-3, epochs=2, passage_sequence=True),
    "cloze-2ep-lr3e-3": Recipe("cloze-2ep-lr3e-3", lr=3e-3, epochs=2, passage_sequence=True,
                               model_augmentation=False),
    # fewer training tokens: QA1 and QA2 with the passage only (not again with the rewrite): 4 sequences, not 6
    "passage-4ep-lean": Recipe("passage-4ep-lean", lr=1e-3, epochs=4, passage_sequence=True, qa_contexts=("passage",)),
    # adapters on the upper half of the layers only: the backward pass stops halfway
    "passage-4ep-top-half": Recipe("passage-4ep-top-half", lr=1e-3, epochs=4, passage_sequence=True, top_layers=0.5),
    # the passage alone, as plain language modelling
    "passage-only-4ep": Recipe("passage-only-4ep", lr=1e-3, epochs=4, passage_sequence=True, qa_sequences=False,
                               model_augmentation=False),
}
DEFAULT_PRESET = "passage-4ep"


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"unknown adapter recipe {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]
