"""`knowmux router train --from RUN [--from RUN ...]`: the router's classifier from bench runs.

Adaptive-RAG's recipe (Jeong et al., 2024), with our strategies for its three levels:
every question answered by several fixed strategies in the runs gets the label of the
*cheapest* strategy that answered it correctly, cost being the strategy's median latency
in those runs. A question no strategy answered is labelled with the strategy most often
right on its data set (Adaptive-RAG's fallback to the data set's inductive bias), so the
classifier also learns which kind of question wants which strategy when nothing is easy.

Features are recomputed from each run's data dir (its knowledge base: the question
embedding and the retrieval scores, server.router.features) with the same code the
server runs, so training needs no model. "Correct": `contains` for questions; for
conflict sets, the answer the data set counts as true (rgb_en_fact's passages are
counterfactual: the memory answer; the others: the context answer).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from .classifier import RouterClassifier
from .features import NUMERIC, Features, question_words
from .router import NARROWABLE, PREFERENCE

# conflict sets whose passages are counterfactual: the model's own (memory) answer is the true one
MEMORY_IS_TRUE = {"rgb_en_fact"}


class TrainError(ValueError):
    pass


def _run_data_dir(run: Path, meta: dict) -> Path:
    if meta.get("data_dir"):
        return Path(meta["data_dir"])
    args = shlex.split(meta.get("command", ""))
    if "--data-dir" in args:
        return Path(args[args.index("--data-dir") + 1])
    raise TrainError(f"{run}: the run does not record its data dir (it ran against --url); "
                     "re-run the bench with --data-dir")


def _correct(rec: dict, dataset: str) -> float | None:
    if rec.get("kind") == "conflicts":
        return rec.get("has_memory") if dataset in MEMORY_IS_TRUE else rec.get("has_context")
    return rec.get("contains")


def load_runs(runs: list[Path], train_fraction: float = 1.0) -> dict:
    """{(dataset, kind, id): {"question", "top_k", "data_dir", "outcomes": {strategy: correct}}}
    and the latencies per strategy. Only plain strategies and CK-PLUG's adaptive setting
    are candidates (a fixed-alpha sweep is a study, not a strategy the router can pick)."""
    items: dict = {}
    latency: dict = defaultdict(list)
    for run in runs:
        try:
            meta = json.loads((run / "results.json").read_text())
            lines = (run / "results.jsonl").read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise TrainError(f"{run}: not a bench output folder ({e})") from None
        dataset, data_dir = meta.get("dataset", "?"), _run_data_dir(run, meta)
        settings = meta.get("settings", {})
        order: dict = defaultdict(list)  # kind -> ids in the run's (the data set's) order
        for line in lines:
            r = json.loads(line)
            if r["id"] not in order[r.get("kind", "questions")]:
                order[r.get("kind", "questions")].append(r["id"])
        keep = {kind: set(ids[:int(round(len(ids) * train_fraction))]) for kind, ids in order.items()}
        for line in lines:
            r = json.loads(line)
            if r.get("error") is not None or r.get("strategy") == "auto":
                continue
            alpha = r.get("ckplug_alpha")
            if alpha not in (None, "adaptive"):
                continue
            kind = r.get("kind", "questions")
            if r["id"] not in keep[kind]:
                continue
            ok = _correct(r, dataset)
            if ok is None:
                continue
            key = (dataset, kind, r["id"])
            top_k = settings.get("conflict_top_k", 1) if kind == "conflicts" else settings.get("top_k", 3)
            it = items.setdefault(key, {"question": r["question"], "top_k": top_k, "data_dir": data_dir,
                                        "outcomes": {}})
            it["outcomes"].setdefault(r["strategy"], float(ok) >= 0.5)
            latency[r["strategy"]].append(r["latency_s"])
    if not items:
        raise TrainError("no usable answers in the runs (every record failed, or none is scored)")
    return {"items": items, "latency": {s: statistics.median(v) for s, v in latency.items()}}


def label(items: dict, latency: dict) -> tuple[list, list[str], list[str], dict]:
    """(keys, labels, strategies cheapest first, fallback per dataset)."""
    order = sorted(latency, key=latency.get)
    right: dict = defaultdict(Counter)
    for (dataset, _, _), it in items.items():
        for s, ok in it["outcomes"].items():
            right[dataset][s] += ok
    # among the strategies run on that data set (one never run there is no answer for it)
    fallback = {d: max((s for s in order if s in c), key=lambda s: (c[s], -order.index(s))) for d, c in right.items()}
    keys, labels = [], []
    for key, it in items.items():
        correct = [s for s in order if it["outcomes"].get(s)]
        keys.append(key)
        labels.append(correct[0] if correct else fallback[key[0]])
    return keys, labels, order, fallback


def featurise(items: dict, keys: list, embedder) -> np.ndarray:
    from indexes import KnowledgeBase

    kbs: dict = {}
    rows = []
    for key in keys:
        it = items[key]
        d = it["data_dir"]
        if d not in kbs:
            if not (Path(d) / "documents.sqlite3").exists():
                raise TrainError(f"{d}: no knowledge base there (the run's data dir was removed?)")
            kbs[d] = KnowledgeBase(Path(d), embedder)
        kb = kbs[d]
        emb = kb.embed_query(it["question"])
        hits = kb.search_vector(emb, it["top_k"])
        rows.append(Features(emb, [h.score for h in hits], question_words(it["question"])).vector())
    for kb in kbs.values():
        kb.close()
    return np.stack(rows)


def out_of_fold(X: np.ndarray, y: list[str], classes: list[str], dim: int, folds: int = 5,
                seed: int = 0) -> np.ndarray:
    """Each item's class probabilities from a classifier that did not see it: [n, C]."""
    idx = np.random.default_rng(seed).permutation(len(y))
    P = np.zeros((len(y), len(classes)))
    for f in range(folds):
        test = idx[f::folds]
        train = np.setdiff1d(idx, test)
        clf = RouterClassifier.fit(X[train], [y[i] for i in train], classes, dim)
        for i in test:
            P[i] = clf.probabilities(X[i])
    return P


TAUS = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.01)


def routed_choices(P: np.ndarray, classes: list[str], tau: float, default: str) -> list[str]:
    """What the router picks per question from class probabilities P: the classifier's
    most probable class where it is at least ``tau`` sure, else ``default``."""
    return [classes[int(np.argmax(p))] if p.max() >= tau else default for p in P]


def calibrate(P: np.ndarray, classes: list[str], outcomes: list[dict], latency: dict, default: str
              ) -> tuple[float, list[dict], dict]:
    """The smallest confidence threshold at which following the classifier (and the
    default strategy below it) is, out of fold, at least as accurate as the best fixed
    strategy; failing that, the most accurate threshold. Returns (tau, table, fixed)."""
    strategies = sorted({s for o in outcomes for s in o})
    fixed = {s: float(np.mean([o.get(s, False) for o in outcomes])) for s in strategies}
    best_fixed = max(fixed.values())
    table = []
    for tau in TAUS:
        routed = routed_choices(P, classes, tau, default)
        acc = float(np.mean([o.get(r, o.get(default, False)) for r, o in zip(routed, outcomes)]))
        lat = float(np.mean([latency.get(r, latency.get(default, 0.0)) for r in routed]))
        table.append({"min_confidence": tau, "accuracy": round(acc, 4), "mean_latency_s": round(lat, 3),
                      "routed": dict(Counter(routed))})
    ok = [t for t in table if t["accuracy"] >= best_fixed - 1e-9]
    pick = min(ok, key=lambda t: (t["mean_latency_s"], t["min_confidence"])) if ok else \
        max(table, key=lambda t: (t["accuracy"], -t["mean_latency_s"]))
    return pick["min_confidence"], table, fixed


GAPS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def calibrate_one_passage(keys: list, gaps: np.ndarray, outcomes: list[dict], latency: dict, one: dict,
                          one_latency: dict, choices: Optional[list[str]] = None
                          ) -> tuple[Optional[float], list[dict]]:
    """The router's one-passage rule (server.router.router, rule 7) from runs answered with
    the top passage alone (``one``: key -> {strategy: correct}). ``choices`` are the
    strategies the router picks for these questions before the rule (out of fold; default:
    the best fixed strategy for every question); the rule narrows only the passage-reading
    ones (rag, kv) to the top passage (``kv`` where the run has it, else ``rag``). Picks the
    lead of the best hit over the second at which the router is, on these questions, at
    least as accurate as the best fixed strategy, at the lowest mean latency; None when
    no lead is, or when never narrowing is faster. Returns (gap, table)."""
    strategies = sorted({s for o in outcomes for s in o})
    acc = {s: float(np.mean([o.get(s, False) for o in outcomes])) for s in strategies}
    best = max(strategies, key=lambda s: (acc[s], -latency.get(s, 0.0)))
    choices = choices if choices is not None else [best] * len(keys)

    def simulate(tau: Optional[float]) -> dict:
        right, lat, narrowed = [], [], 0
        for key, gap, o, c in zip(keys, gaps, outcomes, choices):
            alone = one.get(key, {})
            s = "kv" if "kv" in alone else "rag" if "rag" in alone else None
            if tau is not None and c in NARROWABLE and s is not None and gap >= tau:
                right.append(alone[s])
                lat.append(one_latency[s])
                narrowed += 1
            else:
                right.append(o.get(c, False))
                lat.append(latency.get(c, 0.0))
        return {"gap": tau, "accuracy": round(float(np.mean(right)), 4),
                "mean_latency_s": round(float(np.mean(lat)), 3), "narrowed": narrowed}

    table = [simulate(tau) for tau in GAPS]
    off = simulate(None)
    ok = [t for t in table if t["narrowed"] and t["accuracy"] >= acc[best] - 1e-9]
    pick = min([off, *ok], key=lambda t: (t["mean_latency_s"], t["narrowed"] == 0, -(t["gap"] or 0.0)))
    head = {"best_fixed": best, "accuracy": round(acc[best], 4), "mean_latency_s": round(latency[best], 3),
            "router_without_rule": {k: off[k] for k in ("accuracy", "mean_latency_s")}}
    return pick["gap"], [head, *table]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="knowmux router train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="runs", type=Path, action="append", required=True,
                    help="a knowmux bench --out folder (repeatable)")
    ap.add_argument("--out", type=Path, required=True,
                    help="where to write classifier.safetensors/.json (the server reads DATA_DIR/router)")
    ap.add_argument("--one-passage-from", dest="one_runs", type=Path, action="append", default=[],
                    help="a bench run of the same questions with --top-k 1 (repeatable): calibrates the "
                         "router's one-passage rule")
    ap.add_argument("--train-fraction", type=float, default=1.0,
                    help="train on this leading fraction of each run's questions and hold the rest out "
                         "(evaluate on them with knowmux bench --skip)")
    a = ap.parse_args(argv)
    try:
        from indexes.embedder import Embedder

        t0 = time.time()
        if not 0 < a.train_fraction <= 1:
            raise TrainError("--train-fraction must be in (0, 1]")
        loaded = load_runs(a.runs, a.train_fraction)
        keys, labels, order, fallback = label(loaded["items"], loaded["latency"])
        embedder = Embedder()
        X = featurise(loaded["items"], keys, embedder)
        classes = [s for s in order if s in set(labels)]
        dim = embedder.dim
        counts = Counter(labels)
        default = next(s for s in PREFERENCE if s in classes)
        tau, table, fixed, cv, choices = 0.0, [], {}, None, None
        if len(keys) >= 10:
            P = out_of_fold(X, labels, classes, dim)
            cv = float(np.mean([classes[int(np.argmax(p))] == t for p, t in zip(P, labels)]))
            tau, table, fixed = calibrate(P, classes, [loaded["items"][k]["outcomes"] for k in keys],
                                          loaded["latency"], default)
            choices = routed_choices(P, classes, tau, default)
        one_gap, one_table = None, []
        if a.one_runs:
            one = load_runs(a.one_runs, a.train_fraction)
            gap_col = dim + NUMERIC.index("score_gap")
            one_gap, one_table = calibrate_one_passage(
                keys, X[:, gap_col], [loaded["items"][k]["outcomes"] for k in keys], loaded["latency"],
                {k: it["outcomes"] for k, it in one["items"].items()}, one["latency"], choices)
        clf = RouterClassifier.fit(X, labels, classes, dim, info={
            "one_passage_gap": one_gap, "one_passage_calibration": one_table,
            "min_confidence": tau, "default": default, "calibration": table, "fixed_accuracy": fixed,
            "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [str(r) for r in a.runs], "train_fraction": a.train_fraction,
            "questions": len(keys), "labels": dict(counts), "cost_order": order,
            "median_latency_s": {s: round(v, 3) for s, v in loaded["latency"].items()},
            "fallback": fallback, "cv_label_accuracy": cv, "majority_share": max(counts.values()) / len(keys)})
        clf.save(a.out)
    except (TrainError, OSError) as e:
        print(f"knowmux router train: {e}")
        return 2
    print(f"trained on {len(keys)} questions from {len(a.runs)} run(s) in {time.time() - t0:.1f} s")
    lat = loaded["latency"]
    print("cost order (median latency): " + ", ".join(f"{s} {lat[s]:.2f}s" for s in order))
    print(f"labels: {dict(counts)}; fallback when none is right: {fallback}")
    if cv is not None:
        majority = max(counts.values()) / len(keys)
        print(f"5-fold label accuracy {cv:.3f} (majority class {majority:.3f})")
        if cv <= majority:
            print("warning: the classifier does not beat its majority class; the server will not use it "
                  "(routing by rules only)")
        print("fixed strategies, accuracy on these questions: " + ", ".join(f"{s} {v:.3f}" for s, v in fixed.items()))
        for t in table:
            print(f"  follow the classifier when p >= {t['min_confidence']:.2f}, else {default}: accuracy "
                  f"{t['accuracy']:.3f}, mean latency {t['mean_latency_s']:.2f} s, routed {t['routed']}")
        print(f"chosen min_confidence {tau} (out of fold: the fastest setting at least as accurate as the best "
              "fixed strategy, else the most accurate)")
    if one_table:
        head, *rows = one_table
        w = head["router_without_rule"]
        print(f"one passage for a rag or kv choice when the best hit leads by >= gap (best fixed "
              f"{head['best_fixed']}: accuracy {head['accuracy']:.3f}, mean latency {head['mean_latency_s']:.2f} s; "
              f"router without the rule {w['accuracy']:.3f}, {w['mean_latency_s']:.2f} s):")
        for t in rows:
            print(f"  gap {t['gap']:.2f}: accuracy {t['accuracy']:.3f}, mean latency {t['mean_latency_s']:.2f} s, "
                  f"{t['narrowed']} narrowed")
        print(f"chosen one-passage gap: {one_gap} (None: the rule stays off)")
    print(f"written to {a.out}")
    return 0
