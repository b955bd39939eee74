"""Adapter training speed, side by side in one run: peft's forward (one document at a
time, the reference) against ``train_many`` (the engine's packed forward, K documents
per step), on the same training sequences.

    python -m bench.train_speed [--groups 1,4,8] [--out bench/results/train_speed.json]

The sequences are those a real build trains on: the `passage-4ep` recipe's six per
document (QA pairs with the passage and with a rewrite in the prompt, one without, the
passage itself), built from passages of the bundled NQ sample with deterministic
augmentation (no generation, so only training is timed). One epoch per measurement;
reports seconds per document per epoch and the ratio against peft. Idle engine, no
serving traffic.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", default="1,4,8")
    ap.add_argument("--out", default="bench/results/train_speed.json")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.augment import deterministic
    from adapters.recipe import get_recipe
    from adapters.train import LoraTrainer, training_sequences
    from bench.speed_common import texts
    from server.engine.model import LlamaRunner
    from server.modelfiles import resolve_model

    path = resolve_model(None)
    served = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    runner = LlamaRunner(served)
    model = copy.deepcopy(served)
    for p in model.parameters():
        p.data = p.data.contiguous()
    recipe = get_recipe("passage-4ep", epochs=1)
    trainer = LoraTrainer(model, tok, recipe, "bench")
    groups = [int(g) for g in a.groups.split(",")]
    docs = [training_sequences(deterministic(t), recipe) for t in texts()[:max(groups)]]
    tokens = sum(len(tok.encode(s.prompt + s.target)) for d in docs for s in d) / len(docs)

    trainer.train(docs[0])  # warm-up
    t0 = time.perf_counter()
    for d in docs[:4]:
        trainer.train(d)
    rows = [{"trainer": "peft, one document", "group": 1, "s_per_doc_epoch": (time.perf_counter() - t0) / 4}]
    for k in groups:
        t0 = time.perf_counter()
        trainer.train_many(docs[:k], runner)
        rows.append({"trainer": "train_many", "group": k, "s_per_doc_epoch": (time.perf_counter() - t0) / k})
    base = rows[0]["s_per_doc_epoch"]
    for r in rows:
        r["speedup_vs_peft"] = base / r["s_per_doc_epoch"]
        print(f"{r['trainer']:20} group {r['group']:2}  {r['s_per_doc_epoch']:.2f} s per document-epoch"
              f"  {r['speedup_vs_peft']:.2f}x", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -m bench.train_speed --groups " + a.groups,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "threads": torch.get_num_threads(),
        "mean_tokens_per_doc_epoch": tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
