"""The one prompt layout shared by every strategy that shows passages.

    [chat-template head + SYSTEM_PROMPT] [passage 1 wrapper] ... [passage k wrapper] [rest + question]

Each part is tokenised on its own, so a passage's tokens do not depend on its
neighbours: ``rag`` prefills exactly these tokens, and ``kv`` (later) injects each
passage's stored cache in place of its segment and prefills only the tail. The
passages sit at the end of the system turn, before the user's own system text (if any)
and the conversation, so everything before them is a fixed prefix.
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
# No rank number in the wrapper: a passage's tokens (and so its stored KV) must not
# depend on where retrieval placed it.
PASSAGE_WRAPPER = "\n\nDocument: {title}\n{text}"
_SENTINEL = "\x00KNOWMUX_PASSAGES\x00"


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
    def __init__(self, tokenizer):
        self.tok = tokenizer

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
        return self._encode(PASSAGE_WRAPPER.format(title=passage.title, text=passage.text))

    def with_passages(self, messages: list[dict], passages: list[Passage]) -> PromptLayout:
        user_system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        system = SYSTEM_PROMPT + _SENTINEL + "".join("\n\n" + s for s in user_system)
        text = self._render([{"role": "system", "content": system}] + rest)
        head, tail = text.split(_SENTINEL, 1)
        return PromptLayout(self._encode(head), [self.passage_ids(p) for p in passages], self._encode(tail))
