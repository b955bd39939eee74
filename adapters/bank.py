"""The adapter bank: one folder per (model, recipe, document content), in peft's format.

    ADAPTERS/<key>/adapter_config.json        peft's config (vLLM and LoRAX load it)
    ADAPTERS/<key>/adapter_model.safetensors   lora_A [r, in] / lora_B [out, r] per projection
    ADAPTERS/<key>/augmentation.json           the rewrite and QA pairs it was trained on
    ADAPTERS/<key>/knowmux.json                model fingerprint, recipe, sha256 of the weights

A folder is written under a temporary name and renamed, so a crash leaves either a
whole adapter or none. ``load`` checks the base model, the checksum and the shapes,
and raises AdapterError naming the document instead of using a bad file.

With a shared ``tier`` (server.tiers: a directory or an S3-compatible store that several
replicas use), a saved adapter's four files are also written there as objects
``<key>.<file>``, ``knowmux.json`` last (the mark that the others are whole), and a
replica that has no folder for a key fetches one from there, checks the weights'
sha256 against ``knowmux.json`` and keeps it as a local folder. A tier that fails is
logged and counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file

from indexes.atomic import atomic_folder
from server import tiers

log = logging.getLogger(__name__)
FILES = ("adapter_config.json", "adapter_model.safetensors", "augmentation.json", "knowmux.json")  # mark last
_KEY = re.compile(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")


class AdapterError(ValueError):
    pass


@dataclass(frozen=True)
class LoraWeights:
    """deltas[(layer, projection)] = (A [r, in], B [out, r]); the delta is (alpha / r) B A."""

    deltas: dict
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_key(model_fingerprint: str, recipe_fingerprint: str, content_hash: str) -> str:
    return hashlib.sha256(f"{model_fingerprint}:{recipe_fingerprint}:{content_hash}".encode()).hexdigest()[:40]


class AdapterBank:
    def __init__(self, root: Path, tier=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tier = tier  # server.tiers.Tier shared by replicas, or None
        self._sweep()

    def _sweep(self, stale_s: float = 3600) -> None:
        """Remove what an interrupted save or delete left behind (hidden, never loaded):
        renamed-away folders at once, unfinished saves once they are an hour old (a save
        in another process may still be running)."""
        now = time.time()
        for p in self.root.glob(".*"):
            try:
                if p.name.startswith(".deleted-") or now - p.stat().st_mtime > stale_s:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            except OSError:
                pass

    def folder(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        """Stored here, or in the shared tier (then fetched here first)."""
        return (self.folder(key) / "knowmux.json").is_file() or self._fetch(key)

    def _tier_call(self, op: str, name: str, *args):
        return tiers.call(self.tier, op, name, *args, label="adapter tier")

    def _fetch(self, key: str) -> bool:
        """Copy the adapter ``key`` from the shared tier into a local folder, checked."""
        if not self._tier_call("exists", f"{key}.knowmux.json"):
            return False
        blobs = {f: self._tier_call("get", f"{key}.{f}") for f in FILES}
        if any(b is None for b in blobs.values()):
            return False
        try:
            meta = json.loads(blobs["knowmux.json"])
        except ValueError:
            meta = {}
        if hashlib.sha256(blobs["adapter_model.safetensors"]).hexdigest() != meta.get("sha256"):
            log.warning("adapter tier %s: %s is damaged (checksum mismatch); not used", self.tier.url, key[:12])
            return False
        with atomic_folder(self.folder(key), prefix=f".{key}.") as tmp:
            for f, data in blobs.items():
                (tmp / f).write_bytes(data)
        return True

    def save(self, key: str, write_peft: Callable[[Path], None], augmentation: dict, meta: dict) -> Path:
        """write_peft(folder) writes adapter_config.json and adapter_model.safetensors."""
        final = self.folder(key)
        with atomic_folder(final, prefix=f".{key}.") as tmp:
            write_peft(tmp)
            weights = tmp / "adapter_model.safetensors"
            (tmp / "augmentation.json").write_text(json.dumps(augmentation, indent=1, ensure_ascii=False))
            meta = {**meta, "key": key, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
            (tmp / "knowmux.json").write_text(json.dumps(meta, indent=1))
        if self.tier is not None:  # (no reading the files back without one)
            for f in FILES:  # knowmux.json last: a replica reading the tier sees a whole adapter or none
                self._tier_call("put", f"{key}.{f}", (final / f).read_bytes())
        return final

    def remove(self, key: str) -> bool:
        """Delete an adapter here and in the shared tier; the folder is renamed first and the
        tier's mark deleted first, so no half-deleted adapter is ever visible."""
        final = self.folder(key)
        shared = bool(self._tier_call("exists", f"{key}.knowmux.json"))
        if shared:
            for f in reversed(FILES):
                self._tier_call("delete", f"{key}.{f}")
        if not final.exists():
            return shared
        gone = self.root / f".deleted-{key}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, gone)
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def meta(self, key: str) -> dict:
        return json.loads((self.folder(key) / "knowmux.json").read_text())

    def load(self, key: str, doc_id: str, model_fingerprint: str, shapes: dict) -> LoraWeights:
        """shapes: projection -> (out_features, in_features) of the base model."""
        folder = self.folder(key)
        if not (folder / "knowmux.json").is_file():
            self._fetch(key)
        try:
            meta = self.meta(key)
            config = json.loads((folder / "adapter_config.json").read_text())
            raw = (folder / "adapter_model.safetensors").read_bytes()
        except (OSError, ValueError) as e:
            raise AdapterError(f"adapter of {doc_id!r} is missing or unreadable ({type(e).__name__})") from None
        if meta.get("model") != model_fingerprint:
            raise AdapterError(f"adapter of {doc_id!r} was trained on another base model")
        if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise AdapterError(f"adapter of {doc_id!r} is corrupt (checksum mismatch)")
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        parts: dict = {}
        for name, t in tensors.items():
            m = _KEY.search(name)
            if m is None:
                continue
            layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
            parts.setdefault((layer, proj), {})[ab] = t.float()
        deltas = {}
        for (layer, proj), ab in parts.items():
            out_f, in_f = shapes[proj]
            a, b = ab.get("A"), ab.get("B")
            if a is None or b is None or tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
                raise AdapterError(f"adapter of {doc_id!r} has wrong shapes for layer {layer} {proj}")
            deltas[(layer, proj)] = (a, b)
        if not deltas:
            raise AdapterError(f"adapter of {doc_id!r} holds no gate/up/down weights")
        return LoraWeights(deltas, rank, alpha)
