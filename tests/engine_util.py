"""Helpers shared by the engine tests (test_model, test_worker, test_scheduler, ...)."""

import threading

from server.engine.types import GenRequest, RowSpec, SamplingParams
from tests.tiny import tiny_engine

PROMPTS = [[5, 9, 13, 200, 31], list(range(40, 77)), [100] * 3 + [7, 8, 9, 10, 11, 12], [250, 3, 90]]


def greedy(n, ignore_eos=True, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=ignore_eos, **kw)


class Collector:
    """A sink that records events; .tokens and .text when finished."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def text(self):
        return "".join(ev.text for ev in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason if self.events and self.events[-1].finish_reason else None


def recording_hook(seen: list):
    """Masks eos (as transformers' min_new_tokens does) and records each greedy choice."""

    def hook(lg):
        out = lg[0].clone()
        out[2] = float("-inf")
        seen.append(int(out.argmax()))
        return out

    return hook


def run_alone(prompt, n, limits=None, **kw):
    eng = tiny_engine(limits)
    seen = []
    hook = recording_hook(seen)
    c = Collector()
    eng.worker.submit(GenRequest("x", [RowSpec(prompt)], greedy(n, **kw), logits_hook=hook), c)
    while eng.worker.step():
        pass
    return seen, c

