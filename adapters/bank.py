"""The adapter bank: one folder per (model, recipe, document content), in peft's format.

    ADAPTERS/<key>/adapter_config.json        peft's config (vLLM and LoRAX load it)
    ADAPTERS/<key>/adapter_model.safetensors   lora_A [r, in] / lora_B [out, r] per projection
    ADAPTERS/<key>/augmentation.json           the rewrite and QA pairs it was trained on
    ADAPTERS/<key>/knowmux.json                model fingerprint, recipe, sha256 of the weights

A folder is written under a temporary name and renamed, so a crash leaves either a
whole adapter or none. ``load`` checks the base model, the checksum and the shapes,
and raises AdapterError naming the document instead of using a bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file

from indexes.atomic import atomic_folder

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
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
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
        return (self.folder(key) / "knowmux.json").is_file()

    def save(self, key: str, write_peft: Callable[[Path], None], augmentation: dict, meta: dict) -> Path:
        """write_peft(folder) writes adapter_config.json and adapter_model.safetensors."""
        final = self.folder(key)
        with atomic_folder(final, prefix=f".{key}.") as tmp:
            write_peft(tmp)
            weights = tmp / "adapter_model.safetensors"
            (tmp / "augmentation.json").write_text(json.dumps(augmentation, indent=1, ensure_ascii=False))
            meta = {**meta, "key": key, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
            (tmp / "knowmux.json").write_text(json.dumps(meta, indent=1))
        return final

    def remove(self, key: str) -> bool:
        """Delete an adapter folder; rename first, so no half-deleted adapter is ever visible."""
        final = self.folder(key)
        if not final.exists():
            return False
        gone = self.root / f".deleted-{key}-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, gone)
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def meta(self, key: str) -> dict:
        return json.loads((self.folder(key) / "knowmux.json").read_text())

    def load(self, key: str, doc_id: str, model_fingerprint: str, shapes: dict) -> LoraWeights:
        """shapes: projection -> (out_features, in_features) of the base model."""
        folder = self.folder(key)
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
