"""Document knowledge: the durable store, the embedder, the FAISS index, ingest.

A library: nothing here imports ``server``."""

from .knowledge import Hit, KnowledgeBase  # noqa: F401
from .store import Document  # noqa: F401
