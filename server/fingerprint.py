"""A model's fingerprint: what every stored artefact (KV caches, adapters) is keyed by,
so that one built for other weights is never used."""

from __future__ import annotations

import hashlib


def model_fingerprint(runner, model_id: str) -> str:
    """Identifies the weights cheaply: config, and the first bytes of embeddings and lm_head."""
    return fingerprint_of(runner.config, runner.embed, runner.lm_head.t, model_id)


def fingerprint_of(config, embed, lm_head_t, model_id: str) -> str:
    """The fingerprint from a transformers config, the embedding matrix and the transposed
    lm_head ([hidden, vocab]); engines without our runner (vllm) compute it from the model folder."""
    h = hashlib.sha256(model_id.encode())
    h.update(config.to_json_string(use_diff=False).encode())
    # as float32 values (bytes unchanged for a float32 model): the weights as loaded, so a
    # model loaded in another dtype (its weights rounded) gets a fingerprint of its own
    h.update(embed.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    head = lm_head_t.detach()
    # the first 4096 values in row-major order; from the first row where it is that long,
    # as flattening a transposed view would copy the whole matrix
    first = head[0, :4096] if head.shape[1] >= 4096 else head.flatten()[:4096]
    h.update(first.float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]
