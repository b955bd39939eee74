"""How often does the model itself (plain transformers, no knowmux) give the same greedy
answer in two dtypes? The floor under any engine's bf16-vs-fp32 agreement.

    python -m bench.dtype_floor --n 80 --out bench/results/dtype_floor.json

Loads the model folder in float32 and in the other dtype, asks the first --n questions
of the NQ-open oracle set (bench.datasets) with the model's chat template (no passages: ``direct``'s
question), --max-tokens greedy tokens each, and counts identical answers, answers whose
first 8 words are identical, and the first token at which they part.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.datasets import load
    from server.modelfiles import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("KNOWMUX_DATA_ROOT", "../shared/data")))
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    qs = [q.question for q in load("nq_open_oracle", a.data_root).questions[:a.n]]
    answers = {}
    for dtype in ("float32", a.dtype):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        outs = []
        for q in qs:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.no_grad():
                g = model.generate(**ids, max_new_tokens=a.max_tokens, do_sample=False)
            outs.append(g[0, ids["input_ids"].shape[1]:].tolist())
        answers[dtype] = outs
        del model
    same = same8 = 0
    parted = []
    for x, y in zip(answers["float32"], answers[a.dtype]):
        tx, ty = tok.decode(x, skip_special_tokens=True).strip(), tok.decode(y, skip_special_tokens=True).strip()
        same += tx == ty
        same8 += tx.split()[:8] == ty.split()[:8]
        parted.append(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None))
    n = len(qs)
    res = {"command": "python -m bench.dtype_floor " + " ".join(argv or []), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
           "model": path.name, "dtype": a.dtype, "n": n, "max_tokens": a.max_tokens,
           "identical": same / n, "same_first_8_words": same8 / n,
           "first_differing_token": parted}
    print(f"transformers {path.name}, float32 vs {a.dtype}, {n} questions, {a.max_tokens} greedy tokens: "
          f"identical {same / n:.1%}, same first 8 words {same8 / n:.1%}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
