"""Write a held-out set of invented facts: short biographies of people who never lived,
in the generic corpus/questions format, so no model can answer them from memory.

    python -m bench.make_invented [--n 60] [--seed 7] [--out bench/data/invented_facts]

Every name, town and named work is put together from syllables by a seeded generator
(so the set is reproducible and shares nothing with bench.prag_recipes' four documents);
each document carries two facts, each asked by one question whose answer appears only in
that document. `direct` should answer almost none; `rag` with the right passage, nearly all.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ["Alma", "Bruno", "Carys", "Dario", "Edda", "Felix", "Greta", "Hakon", "Ines", "Jonas", "Katya", "Lorenz",
         "Mira", "Nils", "Odile", "Pavel", "Quinn", "Rosa", "Stellan", "Tilde", "Ulla", "Viktor", "Wanda", "Yusuf"]
SYL_A = ["Brom", "Cald", "Dras", "Eld", "Fenn", "Gorm", "Hask", "Isen", "Jark", "Kell", "Lorr", "Mord", "Narv",
         "Orl", "Penn", "Quar", "Rusk", "Sarn", "Thal", "Umb", "Varr", "Wick", "Yarl", "Zell"]
SYL_B = ["wick", "holt", "mere", "ford", "brand", "wyn", "stead", "mark", "ridge", "vale", "thorn", "by"]
TOWN_B = ["ovo", "heim", "ska", "port", "avik", "ello", "stad", "ach", "ura", "ford"]
COUNTRIES = ["Norway", "Portugal", "Chile", "Canada", "Poland", "Kenya", "Japan", "Italy", "Ireland", "Peru"]
ADJ = ["Amber", "Silent", "Copper", "Hollow", "Crimson", "Velvet", "Iron", "Winter", "Golden", "Paper"]
NOUN = ["Harbour", "Lantern", "Orchard", "Compass", "Meadow", "Falcon", "Anchor", "Glacier", "Willow", "Beacon"]

# (profession, how the named work is introduced, its kind, the question asking for it)
WORKS = [
    ("novelist", "{s}'s best known novel is {w}.", "The {a} {n}", "What is {p}'s best known novel?"),
    ("jazz pianist", "{s} founded the {w} in {y2}.", "{a} {n} Quartet", "Which band did {p} found?"),
    ("botanist", "In {y2} {s} described a new orchid and named it {w}.", "{L} {l}",
     "What did {p} name the orchid she described?"),
    ("architect", "{s}'s best known building is the {w} in Lisbon.", "{a} {n} Hall", "What is {p}'s best known building?"),
    ("chemist", "{s} invented a glue called {w} in {y2}.", "{A}{nl}", "What was the glue that {p} invented called?"),
    ("chess player", "{s} won the {w} in {y2}.", "{a} {n} Open", "Which tournament did {p} win?"),
    ("film director", "{s}'s first film was {w}.", "The {a} {n}", "What was {p}'s first film?"),
    ("ship designer", "{s} designed the ferry {w}.", "{a} {n}", "Which ferry did {p} design?"),
]


def make(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    corpus, questions, seen = [], [], set()
    while len(corpus) < n:
        first = rng.choice(FIRST)
        last = rng.choice(SYL_A) + rng.choice(SYL_B)
        town = rng.choice(SYL_A) + rng.choice(TOWN_B)
        if last in seen or town in seen:
            continue
        seen.update((last, town))
        person, year = f"{first} {last}", rng.randrange(1930, 1990)
        job, sentence, kind, ask = WORKS[len(corpus) % len(WORKS)]
        a, nn = rng.choice(ADJ), rng.choice(NOUN)
        work = kind.format(a=a, n=nn, A=rng.choice(SYL_A), nl=rng.choice(TOWN_B), L=rng.choice(SYL_A) + "ia",
                           l=rng.choice(SYL_A).lower() + "ensis")
        if work in seen:
            continue
        seen.add(work)
        i = len(corpus)
        text = (f"{person} is {'an' if job[0] in 'aeiou' else 'a'} {job} born in {year} in the town of {town} in {rng.choice(COUNTRIES)}. "
                + sentence.format(w=work, y2=year + rng.randrange(22, 40), s=last))
        corpus.append({"id": f"inv-{i:03d}", "title": person, "text": text})
        questions.append({"id": f"inv-q{i:03d}a", "question": f"In which town was {person} born?",
                          "answers": [town], "gold_doc_ids": [f"inv-{i:03d}"]})
        questions.append({"id": f"inv-q{i:03d}b", "question": ask.format(p=person),
                          "answers": [work], "gold_doc_ids": [f"inv-{i:03d}"]})
    return corpus, questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60, help="documents (two questions each)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench/data/invented_facts"))
    a = ap.parse_args()
    corpus, questions = make(a.n, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("questions.jsonl", questions)):
        (a.out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(corpus)} documents, {len(questions)} questions -> {a.out}")


if __name__ == "__main__":
    main()
