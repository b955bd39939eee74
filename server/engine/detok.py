"""Incremental detokenisation with stop strings.

Text is released as soon as it can no longer change: bytes of an unfinished UTF-8
character (decoded as U+FFFD) and the tail that could still become a stop string are
held back until the next token decides them.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # full decoded text so far (up to a stop string, if one matched)
        self._sent = 0  # characters of self.text already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly released text (maybe empty).
        Sets ``stopped`` when a stop string appears; the stop string itself is not released."""
        self.ids.append(token_id)
        text = self._tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        self.text = text
        if self._stop:
            search_from = max(0, self._sent - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                self.stopped = True
                return self.flush()
            safe = max(self._sent, len(text) - self._hold)
        else:
            safe = len(text)
        out = text[self._sent:safe]
        self._sent = safe
        return out

    def flush(self) -> str:
        """Release everything held back (at the end of generation)."""
        out = self.text[self._sent:]
        self._sent = len(self.text)
        return out
