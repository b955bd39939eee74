"""Decoding interventions: pure functions of logits (the LogitsProcessor shape)."""
