"""`direct`: no retrieval; the model answers from its own weights (the baseline)."""

from __future__ import annotations

from ..engine.types import RowSpec
from .base import Plan, Query, Strategy, StrategyContext


class Direct(Strategy):
    name = "direct"

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        return Plan(self.name, [RowSpec(ctx.prompts.plain(query.messages))])
