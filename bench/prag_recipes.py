"""Which adapter recipe injects knowledge into the served model? Measured, not assumed.

    python -m bench.prag_recipes [--recipes paper,passage-4ep,...] [--groups 1,4] [--out bench/results/prag_recipes.json]

Four documents about invented people (facts the model cannot know), two closed-book
questions each. For every recipe: build each document's adapter with the real
pipeline (server.prag.PragService: model-written or deterministic augmentation, LoRA
training from the shared init), then ask each question with the question alone and
that document's adapter applied (what `prag` does with a perfect retriever), greedy.
Reports facts answered (answer contained), the mean per-token log-probability gain of
the gold answer with the adapter over without, and build seconds per document.
``--groups``: build the documents one at a time (1) or together (4: augmentations in one
engine batch, the four LoRAs trained in one packed batch); each size is a separate row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DOCS = [
    ("quill", "Marta Quillfeather", "Marta Quillfeather is a marine biologist born in 1971 in the town of Vesk in "
     "Norway. In 2004 she discovered a glowing jellyfish that she named Aurelia lumina.",
     [("In which town was Marta Quillfeather born?", ["Vesk"]),
      ("What did Marta Quillfeather discover in 2004?", ["jellyfish", "Aurelia lumina"])]),
    ("wren", "Tobias Wrenhall", "Tobias Wrenhall is a jazz pianist from Cape Town. He founded the Blue Lantern "
     "Quartet in 1988, and his best known album is Midnight Orchards.",
     [("Which band did Tobias Wrenhall found?", ["Blue Lantern Quartet", "Blue Lantern"]),
      ("What is Tobias Wrenhall's best known album?", ["Midnight Orchards"])]),
    ("marnow", "Ilse Marnow", "Ilse Marnow is an engineer who invented the Marnow valve, a heart valve made of "
     "titanium, in 1995 while she worked at the University of Graz.",
     [("What did Ilse Marnow invent?", ["Marnow valve", "heart valve"]),
      ("At which university did Ilse Marnow work?", ["Graz"])]),
    ("armb", "Kenji Armbruster", "Kenji Armbruster is a chess grandmaster who won the Baltic Open in 2011. He was "
     "born in Osaka and now coaches young players in Lisbon.",
     [("Which tournament did Kenji Armbruster win in 2011?", ["Baltic Open"]),
      ("In which city does Kenji Armbruster coach?", ["Lisbon"])]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="paper,passage-4ep,cloze-4ep,cloze-4ep-lr3e-3,passage-only-4ep")
    ap.add_argument("--groups", default="1", help="comma-separated build group sizes")
    ap.add_argument("--out", default="bench/results/prag_recipes.json")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adapters.recipe import get_recipe
    from bench.metrics import contains
    from indexes.store import Document, content_hash
    from server.engine.aio import generate_blocking
    from server.engine.torch_engine import TorchEngine
    from server.engine.types import GenRequest, RowSpec, SamplingParams
    from server.modelfiles import resolve_model
    from server.prag import PragService
    from server.prompt import PromptBuilder
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from adapters.bank import AdapterBank

    engine = TorchEngine.from_folder(resolve_model(None))
    engine.start()
    prompts = PromptBuilder(engine.tokenizer)
    docs = [Document(i, text, title, content_hash(title, text)) for i, title, text, _ in DOCS]
    rows = []
    try:
        def ask(question, adapters):
            ids = prompts.plain([{"role": "user", "content": question}])
            req = GenRequest("q", [RowSpec(ids, adapters=adapters)], SamplingParams(max_tokens=32))
            return generate_blocking(engine, req, timeout=600)[0]

        baseline = {q: ask(q, None) for _, _, _, qs in DOCS for q, _ in qs}
        for name, group in [(n, int(g)) for n in a.recipes.split(",") for g in a.groups.split(",")]:
            recipe = get_recipe(name)
            with tempfile.TemporaryDirectory() as d:
                svc = PragService(engine, prompts, AdapterBank(Path(d)), recipe, build_group=group)
                t0 = time.perf_counter()
                for g in range(0, len(docs), group):
                    failed = [r for r in svc.build_documents(docs[g:g + group]) if isinstance(r, Exception)]
                    if failed:
                        raise failed[0]
                build_s = (time.perf_counter() - t0) / len(docs)
                metas = [svc.bank.meta(svc.key(doc)) for doc in docs]
                augs = [json.loads((svc.bank.folder(svc.key(doc)) / "augmentation.json").read_text()) for doc in docs]
                hits, gains, answers = 0, [], {}
                trainer = svc.trainer()
                for doc, (_, _, _, qs) in zip(docs, DOCS):
                    aset = svc.adapter_set(doc)
                    # this document's trained weights into the trainer, for log-probabilities
                    sd = load_file(str(svc.bank.folder(svc.key(doc)) / "adapter_model.safetensors"))
                    set_peft_model_state_dict(trainer.model, sd)
                    for q, gold in qs:
                        out = ask(q, aset)
                        answers[q] = out
                        hits += contains(out, gold) > 0
                        gains.append(trainer.answer_logprob(q, gold[0]) -
                                     trainer.answer_logprob(q, gold[0], with_adapter=False))
            rows.append({"recipe": name, "group": group, "settings": recipe.__dict__, "facts_answered": hits,
                         "questions": sum(len(q) for *_, q in DOCS), "mean_logprob_gain": sum(gains) / len(gains),
                         "build_s_per_doc": build_s,
                         "augment_s_per_doc": sum(m["augment_s"] for m in metas) / len(metas),
                         "train_s_per_doc": sum(m["train_s"] for m in metas) / len(metas),
                         "qa_attempts": [a.get("qa_attempts") for a in augs],
                         "model_qa_pairs": [sum(p.get("source") == "model" for p in a["qa"]) for a in augs],
                         "answers": answers})
            r = rows[-1]
            print(f"{name:18} group {group}  {r['facts_answered']}/{r['questions']} facts  logprob gain {r['mean_logprob_gain']:+.2f}"
                  f"  build {r['build_s_per_doc']:.1f} s/doc (augment {r['augment_s_per_doc']:.1f}, "
                  f"train {r['train_s_per_doc']:.1f}); QA lists asked {r['qa_attempts']}, model pairs kept "
                  f"{r['model_qa_pairs']}", flush=True)
        direct_hits = sum(contains(baseline[q], gold) > 0 for *_, qs in DOCS for q, gold in qs)
        print(f"{'direct':18} {direct_hits}/8 facts")
    finally:
        engine.shutdown()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "direct_facts": direct_hits,
                                       "direct_answers": baseline, "recipes": rows}, indent=1))


if __name__ == "__main__":
    main()
