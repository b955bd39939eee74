"""`rag+ckplug`: retrieval in the prompt, decoded under CK-PLUG's confidence-gain
reweighting (server.decoding.ckplug has the paper's formula).

The request runs as two rows of the running batch: row 0 is the `rag` prompt, row 1
the same layout with no passages (what the model knows without the context). Both
advance in the same forward pass each step; the logits hook mixes their logits.
"""

from __future__ import annotations

from ..decoding.ckplug import CONDITIONS, CKPlugHook, parse_alpha
from ..engine.types import RowSpec
from ..errors import InvalidRequest
from .base import Plan, Query, Strategy, StrategyContext
from .rag import retrieve


def ckplug_hook(query: Query) -> CKPlugHook:
    """Validate the request's ckplug_* options (400 naming the field) and build the hook."""
    opts = query.options
    try:
        alpha = parse_alpha(opts.get("ckplug_alpha"))
    except ValueError as e:
        raise InvalidRequest(str(e), param="ckplug_alpha") from None
    condition = opts.get("ckplug_condition")
    condition = "paper" if condition is None else condition
    if condition not in CONDITIONS:
        raise InvalidRequest(f"ckplug_condition must be one of {', '.join(CONDITIONS)}", param="ckplug_condition")
    return CKPlugHook(alpha=alpha, condition=condition, record=bool(opts.get("ckplug_trace")))


class RagCKPlug(Strategy):
    name = "rag+ckplug"
    needs_documents = True

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        hook = ckplug_hook(query)
        retrieved, passages, ms = retrieve(query, ctx)
        with_context = ctx.prompts.with_passages(query.messages, passages).ids
        without_context = ctx.prompts.with_passages(query.messages, []).ids
        return Plan(self.name, [RowSpec(with_context), RowSpec(without_context)], retrieved, logits_hook=hook,
                    timings_ms={"retrieve": ms}, report=lambda: {"ckplug": hook.summary()})
