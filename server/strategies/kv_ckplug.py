"""`kv+ckplug`: `kv`'s injected passage caches as the with-context stream, decoded under
CK-PLUG's confidence-gain reweighting (server.decoding.ckplug). Row 0 is the `kv` row
(stored caches + the question), row 1 the layout with no passages; both advance in one
forward pass per step."""

from __future__ import annotations

from ..engine.types import RowSpec
from .base import Plan, Query, Strategy, StrategyContext
from .ckplug import ckplug_hook
from .kv import KV


class KVCKPlug(Strategy):
    name = "kv+ckplug"
    needs_documents = True

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        hook = ckplug_hook(query)  # validate before any cache work
        plan = KV().plan(query, ctx)
        plan.rows.append(RowSpec(ctx.prompts.with_passages(query.messages, []).ids))
        plan.strategy, plan.logits_hook = self.name, hook
        plan.report = lambda: {"ckplug": hook.summary()}
        return plan
