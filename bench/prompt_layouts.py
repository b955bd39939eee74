"""Which prompt layout answers best? Every layout of server.prompt.LAYOUTS, given the gold
passage (a perfect top-1 retriever, so only the layout differs), greedy, on the served model.

    python -m bench.prompt_layouts [--layouts user,system,...] [--sets nq,invented] [--n 200]
                                   [--max-tokens 32] [--out bench/results/prompt_layouts.json]

Sets: ``nq``, the bundled NQ-open sample (bench/data/nq_open_sample, each question with its
gold Wikipedia passage); ``nq-heldout``, the next NQ-open questions of ../shared/data
(records 200.., never in the bundled sample, so a layout chosen on ``nq`` is checked on
questions it was not chosen on); ``invented``, the held-out invented facts (bench/data/invented_facts,
written by bench.make_invented: people who never lived, so only the passage can answer);
``invented-dev``, the same generator with another seed (bench/data/invented_facts_dev), on
which candidates are tried so that ``invented`` reports a layout not tuned on it.
``--no-references`` leaves out the ``direct`` and ``question-first`` rows.
Rows: each layout as `rag` prefills it; ``direct`` (the question alone, the model's chat
template); ``question-first``, a reference prompt of the kind one writes by hand (one user
turn: the question, then the passage) that no fixed-head layout can express (`kv` needs
the passages before the question), measured to know what that order would be worth.
Reports answer containment (SQuAD-normalised), exact match and token F1 per set.

``--data-dir DIR --top-k K``: instead of the gold passage, the top K passages retrieved
from DIR (a knowmux data dir with the set's corpus ingested), in retrieval order, as
`rag` shows them; the question-first reference then lists all K after the question.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATA = Path(__file__).parent / "data"
SETS = {"nq": DATA / "nq_open_sample", "invented": DATA / "invented_facts", "invented-dev": DATA / "invented_facts_dev"}


def load_set(name: str, n: int, data_root: Path) -> list[tuple[str, list[str], dict]]:
    """(question, answers, gold document) triples."""
    from bench.datasets import load_generic, nq_open_oracle

    if name == "nq-heldout":
        ds = nq_open_oracle(data_root)
        questions = ds.questions[200:200 + n]
    else:
        ds = load_generic(SETS[name] / "corpus.jsonl", SETS[name] / "questions.jsonl", None)
        questions = ds.questions
    docs = {d["id"]: d for d in ds.corpus}
    out = []
    for q in questions:
        gold = [docs[i] for i in q.gold_doc_ids if i in docs]
        if gold:
            out.append((q.question, q.answers, gold[0]))
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", help="comma-separated (default: all of server.prompt.LAYOUTS)")
    ap.add_argument("--extra", help="more conditions, e.g. user+answer-prefix (a layout's prompt with the "
                                    "assistant turn opened by 'The answer is', as PRAG's code prompts)")
    ap.add_argument("--no-references", action="store_true", help="leave out the direct and question-first rows")
    ap.add_argument("--sets", default="nq,invented")
    ap.add_argument("--n", type=int, default=200, help="first N questions of each set")
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("KNOWMUX_DATA_ROOT", "../shared/data")))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (one engine batch)")
    ap.add_argument("--data-dir", type=Path, help="retrieve the passages from this data dir (default: the gold one)")
    ap.add_argument("--top-k", type=int, default=3, help="with --data-dir: passages retrieved per question")
    ap.add_argument("--model", help="a model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default="bench/results/prompt_layouts.json")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.metrics import contains, exact_match, f1
    from server.engine.aio import generate_blocking
    from server.engine.torch_engine import TorchEngine
    from server.engine.types import GenRequest, RowSpec, SamplingParams
    from server.modelfiles import resolve_model
    from server.prompt import LAYOUTS, Passage, PromptBuilder

    layouts = a.layouts.split(",") if a.layouts else list(LAYOUTS)
    extra = [c for c in (a.extra or "").split(",") if c]
    engine = TorchEngine.from_folder(resolve_model(a.model))
    engine.start()
    plain = PromptBuilder(engine.tokenizer)

    kb = None
    if a.data_dir:
        from indexes import KnowledgeBase
        from server.runtime import embedder_for

        kb = KnowledgeBase(a.data_dir, embedder_for(engine))
    retrieved: dict[str, list[dict]] = {}  # filled before the requests run (one search per question)

    def passages_for(question: str, doc: dict) -> list[dict]:
        return retrieved[question] if kb is not None else [doc]

    def search(question: str) -> list[dict]:
        hits = kb.search(question, a.top_k)
        got = kb.get_many([h.doc_id for h in hits])
        return [{"id": h.doc_id, "title": got[h.doc_id].title, "text": got[h.doc_id].text} for h in hits]

    def prompt(condition: str, question: str, doc: dict) -> list[int]:
        if condition.endswith("+answer-prefix"):  # the assistant turn opened with "The answer is"
            return prompt(condition.removesuffix("+answer-prefix"), question, doc) + plain._encode("The answer is")
        user = [{"role": "user", "content": question}]
        if condition == "direct":
            return plain.plain(user)
        docs = passages_for(question, doc)
        if condition == "question-first":
            wrapper = LAYOUTS["system"].wrapper  # "\n\nDocument: {title}\n{text}"
            return plain.plain([{"role": "user", "content": question + "".join(
                wrapper.format(title=d.get("title", ""), text=d["text"]) for d in docs)}])
        return PromptBuilder(engine.tokenizer, condition).with_passages(
            user, [Passage(d["id"], d.get("title", ""), d["text"]) for d in docs]).ids

    def answer(ids: list[int]) -> str:
        req = GenRequest("q", [RowSpec(ids)], SamplingParams(max_tokens=a.max_tokens, temperature=0.0))
        return generate_blocking(engine, req, timeout=600)[0]

    rows = []
    try:
        for set_name in a.sets.split(","):
            items = load_set(set_name, a.n, a.data_root)
            if kb is not None:
                retrieved.update({q: search(q) for q, _, _ in items})
            first, last = ([], []) if a.no_references else (["direct"], ["question-first"])
            for condition in [*first, *layouts, *last, *extra]:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(a.concurrency) as pool:
                    outs = list(pool.map(lambda it: answer(prompt(condition, it[0], it[2])), items))
                n = len(items)
                row = {"set": set_name, "condition": condition, "n": n,
                       "contains": sum(contains(o, ans) > 0 for o, (_, ans, _) in zip(outs, items)) / n,
                       "exact_match": sum(exact_match(o, ans) for o, (_, ans, _) in zip(outs, items)) / n,
                       "f1": sum(f1(o, ans) for o, (_, ans, _) in zip(outs, items)) / n,
                       "seconds": round(time.perf_counter() - t0, 1),
                       "answers": [{"question": q, "gold": ans, "output": o} for o, (q, ans, _) in zip(outs, items)]}
                rows.append(row)
                print(f"{set_name:9} {condition:16} contains {row['contains']:.3f}  EM {row['exact_match']:.3f}  "
                      f"F1 {row['f1']:.3f}  (n={n}, {row['seconds']} s)", flush=True)
    finally:
        engine.shutdown()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "model": str(resolve_model(a.model)),
                                       "max_tokens": a.max_tokens,
                                       "passages": f"top {a.top_k} from {a.data_dir}" if a.data_dir else "gold",
                                       "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
