"""`+ckplug`: a strategy's context, decoded under CK-PLUG's confidence-gain reweighting
(server.decoding.ckplug has the paper's formula). `rag+ckplug` here, `kv+ckplug` in
kv_ckplug.py.

The request runs as two rows of the running batch: row 0 is the base strategy's row
(`rag`: passages in the prompt), row 1 the same layout with no passages (what the model
knows without the context). Both advance in the same forward pass each step; the
logits hook mixes their logits.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from ..decoding.ckplug import CKPlugHook
from ..engine import LOGITS_HOOK
from ..engine.types import RowSpec
from ..errors import InvalidRequest
from ..options import parse_alpha
from .base import Plan, Query, Strategy, StrategyContext
from .rag import Rag


def ckplug_hook(query: Query) -> CKPlugHook:
    """The hook for the request's ckplug_* options (server.options has their ranges)."""
    opts = query.options
    try:
        alpha = parse_alpha(opts.get("ckplug_alpha"))
    except ValueError as e:
        raise InvalidRequest(str(e), param="ckplug_alpha") from None
    condition = opts.get("ckplug_condition")  # its values, and epsilon's and variant's, are checked at the wire
    condition = "paper" if condition is None else condition
    epsilon, variant = opts.get("ckplug_epsilon"), opts.get("ckplug_variant")
    return CKPlugHook(alpha=alpha, condition=condition, epsilon=0.0 if epsilon is None else float(epsilon),
                      variant="paper" if variant is None else variant, record=bool(opts.get("ckplug_trace")))


class CKPlug(Strategy):
    """``base``'s plan as the with-context row, plus a row with no passages, decoded under
    CK-PLUG's reweighting. Composes: the base strategy's plan is not changed, a new one
    is returned with the extra row, the hook and its report."""

    base: ClassVar[type[Strategy]]
    needs_documents = True

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        hook = ckplug_hook(query)  # validate before any retrieval or cache work
        plan = self.base().plan(query, ctx)
        # the same prompt less the passages (a layout's worked exchanges stay, as in the row with them)
        without_context = RowSpec(ctx.prompts.with_passages(query.messages, [], shots_for=len(plan.retrieved)).ids)
        base_report = plan.report
        return replace(plan, strategy=self.name, rows=[*plan.rows, without_context], logits_hook=hook,
                       report=lambda: {**(base_report() if base_report is not None else {}), "ckplug": hook.summary()})


class RagCKPlug(CKPlug):
    name = "rag+ckplug"
    base = Rag
    requires = Rag.requires | {LOGITS_HOOK}
