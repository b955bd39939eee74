"""Where the torch engine runs and in what precision: ``--device`` and ``--dtype``.

``auto`` picks what a user of vLLM would get: the first GPU when torch sees one, else the
CPU; on a GPU the model folder's own dtype (bfloat16 for most current models; float16 on a
GPU without bfloat16; float32 folders stay float32), on a CPU float32 (the fast path on
CPUs without bfloat16 instructions, such as the 2-core development machines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch is imported where a device or dtype is resolved: Settings checks names only
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def check_device(spec: str) -> str:
    """``spec`` normalised, or ValueError naming the accepted forms (no torch device probed)."""
    s = (spec or "auto").strip().lower()
    if s in ("auto", "cpu", "cuda"):
        return s
    if s.startswith("cuda:") and s[5:].isdigit():
        return s
    raise ValueError(f"--device must be one of auto, cpu, cuda, cuda:N; got {spec!r}")


def check_dtype(spec: str) -> str:
    s = (spec or "auto").strip().lower()
    s = DTYPE_ALIASES.get(s, s)
    if s == "auto" or s in DTYPE_NAMES:
        return s
    raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got {spec!r}")


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, check_dtype(name))


def resolve_device(spec: str = "auto") -> "torch.device":
    import torch

    s = check_device(spec)
    if s == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(s)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: torch sees no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        if dev.index is None:
            dev = torch.device("cuda:0")
    return dev


def resolve_dtype(spec: str, device: "torch.device", folder_dtype: Optional["torch.dtype"] = None) -> "torch.dtype":
    """The compute dtype for ``spec`` on ``device``; ``folder_dtype`` is the model folder's
    ``torch_dtype`` (what ``auto`` follows on a GPU)."""
    import torch

    s = check_dtype(spec)
    if s != "auto":
        dtype = torch_dtype(s)
    elif device.type == "cpu":
        dtype = torch.float32
    else:
        dtype = folder_dtype if folder_dtype is not None else torch.bfloat16
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if s == "bfloat16":
            raise ValueError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
        dtype = torch.float16
    return dtype


def folder_dtype(path) -> Optional["torch.dtype"]:
    """The ``torch_dtype``/``dtype`` a model folder's config.json names, or None."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    name = DTYPE_ALIASES.get(str(name), str(name))
    return torch_dtype(name) if name in DTYPE_NAMES else None


def dtype_name(dtype: "torch.dtype") -> str:
    return str(dtype).replace("torch.", "")


def tensor_bytes(t: "torch.Tensor") -> bytes:
    """The raw bytes of a tensor in any dtype (``.numpy()`` has no bfloat16), read on the CPU.
    For float32 these are exactly ``t.numpy().tobytes()``, so checksums written before
    dtypes other than float32 existed stay valid."""
    import torch

    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
