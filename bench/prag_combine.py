"""Per-request cost of combining k document adapters: knowmux's row deltas vs the paper's peft path.

    python -m bench.prag_combine --data-dir runs/nq-data [--k 3] [--trials 20]

Takes k*trials adapters a bench run stored (DATA_DIR/adapters) and, for each trial's k
documents, times:
- knowmux cold: ``PragService.row_adapters`` with its memory LRU emptied (read and
  check the k peft folders, build the row deltas, concatenate them: the exact sum);
- knowmux warm: the same k again (LRU hits: only the concatenation);
- the Parametric RAG code's way, which this replaces: ``PeftModel.from_pretrained`` on
  the base model with the first adapter, ``load_adapter`` for the others,
  ``add_weighted_adapter(..., combination_type="cat")``, ``set_adapter``, and after the
  answer ``delete_adapter`` + ``unload`` to get the base model back for the next question.
Generation is not included in either. One process, one after the other, same adapters.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from bench.metrics import percentile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    import torch
    from peft import PeftModel

    from indexes import KnowledgeBase
    from indexes.embedder import Embedder
    from server.config import Settings
    from server.engine.torch_engine import TorchEngine
    from server.modelfiles import resolve_model
    from server.runtime import assemble

    torch.set_grad_enabled(False)
    settings = Settings.from_env(data_dir=a.data_dir)
    engine = TorchEngine.from_folder(resolve_model(settings.model))
    engine.start()
    kb = KnowledgeBase(a.data_dir, Embedder())
    try:
        prag = assemble(engine, kb, settings, data_dir=a.data_dir).artefacts.prag
        docs, after = [], None
        while len(docs) < a.k * a.trials:  # the first documents (in id order) that have an adapter
            page = kb.store.page(after, 200)
            if not page:
                break
            docs += [d for d in page if prag.has(d)]
            after = page[-1].id
        docs = docs[:a.k * a.trials]
        if len(docs) < a.k:
            raise SystemExit(f"fewer than {a.k} stored adapters under {a.data_dir / 'adapters'}")
        groups = [docs[i:i + a.k] for i in range(0, len(docs) - a.k + 1, a.k)]
        base = copy.deepcopy(engine.hf_model)  # peft wraps modules in place: never the served copy
        for p in base.parameters():
            p.data = p.data.contiguous()
        cold, warm, peft_s = [], [], []
        for group in groups:
            prag._cache.clear()
            t0 = time.perf_counter()
            combined, applied, missing, _ = prag.row_adapters(group, [1.0] * a.k)
            cold.append(time.perf_counter() - t0)
            assert applied == a.k and not missing, (applied, missing)
            t0 = time.perf_counter()
            prag.row_adapters(group, [1.0] * a.k)
            warm.append(time.perf_counter() - t0)
            folders = [str(prag.bank.folder(prag.key(d))) for d in group]
            t0 = time.perf_counter()
            model = PeftModel.from_pretrained(base, folders[0], adapter_name="0", is_trainable=False)
            for i, f in enumerate(folders[1:], 1):
                model.load_adapter(f, adapter_name=str(i))
            model.add_weighted_adapter([str(i) for i in range(a.k)], [1.0] * a.k, "merge", combination_type="cat")
            model.set_adapter("merge")
            model.delete_adapter("merge")
            base = model.unload()
            peft_s.append(time.perf_counter() - t0)
        out = {"k": a.k, "trials": len(groups),
               "knowmux_cold_ms": _stats(cold), "knowmux_warm_ms": _stats(warm), "peft_merge_ms": _stats(peft_s),
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        print(json.dumps(out, indent=1))
        if a.out:
            a.out.write_text(json.dumps(out, indent=1))
    finally:
        kb.close()
        engine.shutdown()


def _stats(xs: list[float]) -> dict:
    return {"p50": round(percentile(xs, 50) * 1e3, 3), "p95": round(percentile(xs, 95) * 1e3, 3),
            "mean": round(statistics.mean(xs) * 1e3, 3)}


if __name__ == "__main__":
    main()
