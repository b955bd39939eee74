"""`kv+ckplug`: `kv`'s injected passage caches as the with-context stream, decoded under
CK-PLUG's confidence-gain reweighting (server.decoding.ckplug). Row 0 is the `kv` row
(stored caches + the question), row 1 the layout with no passages; both advance in one
forward pass per step."""

from __future__ import annotations

from ..engine import LOGITS_HOOK
from .ckplug import CKPlug
from .kv import KV


class KVCKPlug(CKPlug):
    name = "kv+ckplug"
    base = KV
    requires = KV.requires | {LOGITS_HOOK}
