"""Parametric RAG (Su et al., 2025): one LoRA adapter per document, built offline.

A library: nothing here imports ``server``. The caller passes in what needs the served
model: a ``generate(prompt, max_tokens) -> str`` function for augmentation, a model to
train, and optionally a ``run(fn)`` executor (the server runs each training step on its
engine thread, between serving steps).
"""
