"""The prompt layouts shared by every strategy that shows passages.

    [head] [passage 1] ... [passage k] [tail: the rest of the conversation + the question]

Each part is tokenised on its own, so a passage's tokens do not depend on its
neighbours: ``rag`` prefills exactly these tokens, and ``kv`` injects each passage's
stored cache in place of its segment and prefills only the tail. Everything before the
passages is a fixed head (it does not depend on the conversation), so a passage's cache,
computed once after that head, fits every request.

Where the passages sit is a named layout (LAYOUTS, ``--prompt-layout``):

- ``system`` (the default): a knowmux system prompt whose end holds the passages, the
  request's system text after them, then the conversation as sent.
- ``user-instruct``: the model's own system turn (its template's default, if any), then
  the first user turn: the passages, one line of instruction, ``Question:`` and the
  user's text. A request's own system messages go into that turn after the passages.
- ``system-example``: ``system`` with one worked example (an invented lake and its
  village) before the passages; knowmux's own variant: with one passage on SmolLM2-135M
  invented facts 83% against ``system``'s 71%, worse at top-3 (60.0% against 67.5%);
  ``system-shots`` answers more with one passage.
- ``system-shots``: ``system`` with two worked exchanges (invented facts) as the first
  turns of the conversation, their documents first among the documents; knowmux's own,
  for one-passage serving: 94.2% of held-out invented facts with the gold passage
  (``system`` 70.0%), short answers; with three passages 30.0% (``system`` 67.5%).
- ``system-fewshot``: ``system`` token for token with one passage; with two or more, two
  exchanges carrying their own documents open the conversation (82.5% of invented facts
  at top-3 against 67.5%, 26% of held-out NQ against 28%); the exchanges are tail tokens
  prefilled with every request, so not the default.
- ``user``, ``user-system``, ``system-question``, ``user-reference``: the other
  candidates measured (bench.prompt_layouts), kept selectable.

The default is the one that measured best where it is used (bench/RESULTS.md, "Prompt
layouts"): with one gold passage on SmolLM2-135M-Instruct ``user-instruct`` answered 17
points more of the bundled NQ sample, but with three retrieved passages (the default
top_k) every layout that puts the passages next to the question lost about 25 points on
invented facts to ``system``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jinja2 import TemplateError

from .errors import InvalidRequest

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the documents below. "
    "If they do not contain the answer, answer from your own knowledge. Answer briefly."
)
EXAMPLE = (
    "\n\nExample.\nDocument: Lake Verrin\nLake Verrin is a glacial lake in the Tarsk Mountains. The fishing "
    "village of Holm lies on its northern shore.\nQuestion: Which village lies on the northern shore of Lake "
    "Verrin?\nAnswer: Holm"
)
# Two worked exchanges, on an invented lake and an invented violinist (so they teach the
# form of an answer and no fact): the second's answer sits in a sentence that names her by
# her surname only, as documents do after their first sentence.
SHOT_DOCUMENTS = (
    ("Lake Verrin", "Lake Verrin is a glacial lake in the Tarsk Mountains. The fishing village of Holm lies on its "
                    "northern shore."),
    ("Marta Quillon", "Marta Quillon is a violinist born in 1938. In 1971 Quillon opened a music school, the "
                      "Brightwater Academy."),
)
SHOTS = (("Which village lies on the northern shore of Lake Verrin?", "Holm"),
         ("Which music school did Marta Quillon open?", "the Brightwater Academy"))
# system-fewshot's exchanges carry their documents in their user turns (as measured, the
# violinist's names her home town)
_INLINE_DOCUMENTS = (SHOT_DOCUMENTS[0], ("Marta Quillon", "Marta Quillon is a violinist from the port town of Serrat. "
                                         "In 1971 Quillon opened a music school, the Brightwater Academy, in her home town."))
INLINE_SHOTS = tuple((f"Document: {t}\n{x}\n\nQuestion: {q}", ans) for (t, x), (q, ans) in zip(_INLINE_DOCUMENTS, SHOTS))
_SENTINEL = "\x00KNOWMUX_PASSAGES\x00"
# one passage at the end of a system turn, and the words that open the documents
SYSTEM_WRAPPER = "\n\nDocument: {title}\n{text}"
DOCUMENTS_INTRO = "\n\nThe documents for this conversation:"


@dataclass(frozen=True)
class LayoutSpec:
    """Where the passages go and the words around them.

    ``placement``: ``system`` (the end of a knowmux system turn) or ``user`` (the start
    of the first user turn). ``system``: the system prompt knowmux adds (None: none, so
    the template's own default, if it has one, stays). ``wrapper``: one passage, with no
    rank number: a passage's tokens (and so its stored KV) must not depend on where
    retrieval placed it. ``intro``: before the passages, in their turn (part of the head).
    ``before_question``: between the passages (and any system text of the request) and
    the first user message. ``shots``: (question, answer) exchanges that open the
    conversation, after the passages (so they are part of the tail, prefilled per request).
    """

    name: str
    placement: str
    system: Optional[str]
    wrapper: str
    before_question: str = ""
    intro: str = ""
    shots: tuple = ()
    shots_from: int = 1  # the fewest passages shown with which the exchanges are added

    def __post_init__(self):
        # worked exchanges open the conversation; with the passages in the first user turn
        # they would take that turn's place
        if self.shots and self.placement != "system":
            raise ValueError("worked exchanges (shots) need the passages in the system turn")


LAYOUTS = {
    "system": LayoutSpec("system", "system", SYSTEM_PROMPT, SYSTEM_WRAPPER),
    # measured beside it (bench.prompt_layouts), kept selectable
    "user-instruct": LayoutSpec("user-instruct", "user", None, "Document: {title}\n{text}\n\n",
                                "Answer the question using the documents above. Answer briefly.\n\nQuestion: "),
    "user": LayoutSpec("user", "user", None, "Document: {title}\n{text}\n\n", "Question: "),
    "user-system": LayoutSpec("user-system", "user", SYSTEM_PROMPT, "Document: {title}\n{text}\n\n", "Question: "),
    "system-question": LayoutSpec("system-question", "system", SYSTEM_PROMPT, SYSTEM_WRAPPER,
                                  "Question: "),
    # knowmux's system prompt with one worked example (an invented place, so it teaches the
    # form of an answer, not a fact), then the passages
    "system-example": LayoutSpec("system-example", "system", SYSTEM_PROMPT + EXAMPLE, SYSTEM_WRAPPER,
                                 intro=DOCUMENTS_INTRO),
    # two worked exchanges as turns of the conversation, their documents first among the
    # documents: short answers (knowmux's own)
    "system-shots": LayoutSpec("system-shots", "system", SYSTEM_PROMPT, SYSTEM_WRAPPER,
                               intro=DOCUMENTS_INTRO
                                     + "".join(SYSTEM_WRAPPER.format(title=t, text=x) for t, x in SHOT_DOCUMENTS),
                               shots=SHOTS),
    # ``system`` when one passage is shown; with two or more, two worked exchanges open the
    # conversation, each user turn carrying its own document (knowmux's own). Its head and
    # passages are ``system``'s, so the same stored KV caches serve both
    "system-fewshot": LayoutSpec("system-fewshot", "system", SYSTEM_PROMPT, SYSTEM_WRAPPER,
                                 shots=INLINE_SHOTS, shots_from=2),
    # the words of Parametric RAG's released prompt (an instruction, the passages, the question)
    "user-reference": LayoutSpec("user-reference", "user", None, "Document: {title}\n{text}\n\n", "Question: ",
                                 intro="You should answer the question by referring to the knowledge provided "
                                       "below and integrating your own knowledge.\n\n"),
}
DEFAULT_LAYOUT = "system"


def get_layout(name: Optional[str]) -> LayoutSpec:
    try:
        return LAYOUTS[name or DEFAULT_LAYOUT]
    except KeyError:
        raise ValueError(f"unknown prompt layout {name!r}; one of {', '.join(LAYOUTS)}") from None


# For a model folder whose tokenizer has no chat template (a base model) and no
# --chat-template: plain role prefixes, which a base model continues more sensibly than
# special tokens it never saw (llama.cpp falls back to a template the same way).
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def ensure_chat_template(tokenizer, path: Optional[Path] = None) -> None:
    """Give ``tokenizer`` the chat template every prompt is rendered with: the file at
    ``path`` if given, else its own, else PLAIN_TEMPLATE (with a warning)."""
    if path is not None:
        try:
            tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"KNOWMUX_CHAT_TEMPLATE: cannot read {path}: {e}") from None
        log.info("chat template from %s", path)
    elif not getattr(tokenizer, "chat_template", None):
        log.warning("the model's tokenizer has no chat template: prompts use knowmux's plain one "
                    "(User:/Assistant: lines); give one with --chat-template FILE")
        tokenizer.chat_template = PLAIN_TEMPLATE


@dataclass(frozen=True)
class Passage:
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class PromptLayout:
    """Token ids split by part: ``head`` (fixed), one list per passage, ``tail`` (the question)."""

    head: list[int]
    passages: list[list[int]]
    tail: list[int]

    @property
    def ids(self) -> list[int]:
        out = list(self.head)
        for p in self.passages:
            out.extend(p)
        out.extend(self.tail)
        return out


class PromptBuilder:
    def __init__(self, tokenizer, layout: Optional[str] = None):
        self.tok = tokenizer
        self.layout = get_layout(layout)

    def _render(self, messages: list[dict]) -> str:
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # a model's template may refuse a conversation (roles must alternate, ...)
            raise InvalidRequest(f"the model's chat template refused these messages: {e}", param="messages") from None

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def plain(self, messages: list[dict]) -> list[int]:
        """The conversation as the model's chat template renders it, no passages."""
        return self._encode(self._render(messages))

    def layout_head(self) -> list[int]:
        """The fixed head of the passage layout (it does not depend on the conversation)."""
        return self.with_passages([{"role": "user", "content": "?"}], []).head

    def passage_ids(self, passage: Passage) -> list[int]:
        return self._encode(self.layout.wrapper.format(title=passage.title, text=passage.text))

    def with_passages(self, messages: list[dict], passages: list[Passage],
                      shots_for: Optional[int] = None) -> PromptLayout:
        """``shots_for``: the passage count that decides the worked exchanges (default: the
        passages given); CK-PLUG's row without passages passes its paired row's, so the two
        rows differ by the passages alone."""
        spec = self.layout
        user_system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [dict(m) for m in messages if m["role"] != "system"]
        first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first_user is not None and spec.before_question:
            rest[first_user]["content"] = spec.before_question + rest[first_user]["content"]
        if (len(passages) if shots_for is None else shots_for) >= spec.shots_from:
            rest = [{"role": r, "content": c} for q, a in spec.shots for r, c in (("user", q), ("assistant", a))] + rest
        if spec.placement == "system":
            system = (spec.system or "") + spec.intro + _SENTINEL + "".join("\n\n" + s for s in user_system)
            convo = [{"role": "system", "content": system}] + rest
        else:
            if first_user is None:
                raise InvalidRequest("the passages go into the first user message, and there is none",
                                     param="messages")
            # the request's system text after the passages, so the head stays fixed
            rest[first_user]["content"] = (spec.intro + _SENTINEL + "".join(s + "\n\n" for s in user_system)
                                           + rest[first_user]["content"])
            convo = ([{"role": "system", "content": spec.system}] if spec.system else []) + rest
        head, tail = self._render(convo).split(_SENTINEL, 1)
        return PromptLayout(self._encode(head), [self.passage_ids(p) for p in passages], self._encode(tail))
