"""The ``knowmux`` command: setup, serve, ingest, ask, router, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import Settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="where everything the server builds lives (env KNOWMUX_DATA_DIR; default ./data)")
    p.add_argument("--model", help="a local transformers causal-LM folder (env KNOWMUX_MODEL; default: the converted "
                                   "SmolLM2-135M-Instruct)")
    p.add_argument("--store", help="the document store: sqlite (default, in the data dir) or "
                                   "postgresql://user:password@host:port/db, shared by replicas with their build "
                                   "jobs (env KNOWMUX_STORE)")


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="where the torch engine and the embedder run: auto (the first GPU if torch "
                                    "sees one, else cpu), cpu, cuda, cuda:N (env KNOWMUX_DEVICE)")
    p.add_argument("--dtype", help="compute dtype: auto (float32 on CPU, the model folder's dtype on a GPU), "
                                   "float32, bfloat16, float16 (env KNOWMUX_DTYPE)")
    p.add_argument("--kv-tier", help="a second tier for KV caches and adapters, shared by replicas: file:///dir "
                                     "or s3://bucket/prefix?endpoint_url=... (env KNOWMUX_KV_TIER)")
    p.add_argument("--kv-store-bytes", type=int, help="disk budget of the local KV store in bytes, least recently "
                                                      "used evicted first (env KNOWMUX_KV_STORE_BYTES; 0 = no limit)")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ap = argparse.ArgumentParser(prog="knowmux", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("setup", help="convert the embedded default model once and cache it")
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    _common(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--engine", choices=["torch", "vllm"], help="inference engine (default torch; vllm needs the vllm extra)")
    s.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    _device_flags(s)
    s.add_argument("--max-model-len", type=int, dest="max_context",
                   help="the longest prompt + answer in tokens (env KNOWMUX_MAX_CONTEXT; default: the model's; "
                        "2048 on vllm-cpu)")
    s.add_argument("--tensor-parallel-size", type=int, help="vllm engine: GPUs per replica (CK-PLUG needs 1)")
    s.add_argument("--gpu-memory-utilization", type=float, help="vllm engine: share of GPU memory it may take "
                                                                "(default 0.9)")
    s.add_argument("--max-loras", type=int, help="vllm engine: adapters (document sets) held at once (default 8)")
    s.add_argument("--max-lora-rank", type=int, help="vllm engine: the largest adapter rank (default 16; 0 = no LoRA)")
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--max-queue", type=int)
    s.add_argument("--max-tokens-in-flight", type=int)
    s.add_argument("--experiments", help="TOML file of A/B experiments (env KNOWMUX_EXPERIMENTS; reloaded on change)")
    s.add_argument("--default-strategy", help="strategy when a request names none (default auto: the router)")
    s.add_argument("--default-temperature", type=float,
                   help="temperature for a request that sets none (default: the model's generation_config, else 1.0)")
    s.add_argument("--default-top-p", type=float,
                   help="top_p for a request that sets none (default: the model's generation_config, else 1.0)")
    s.add_argument("--chat-template", type=Path,
                   help="a Jinja chat template file, for a model folder without one (env KNOWMUX_CHAT_TEMPLATE)")
    s.add_argument("--prompt-layout", help="where the passages go in the prompt: system (default: the end of "
                                           "a knowmux system prompt), user-instruct (the first user turn, "
                                           "before the question), or another of server.prompt.LAYOUTS "
                                           "(env KNOWMUX_PROMPT_LAYOUT)")
    s.add_argument("--builds", help="run build jobs' model work on a Ray cluster: ray://head:10001 (or ray:local); "
                                    "needs --store postgresql://... and --kv-tier (env KNOWMUX_BUILDS)")
    s.add_argument("--job-lease-s", type=float, help="with a shared --store: a running build whose replica is "
                                                     "silent this long is taken over by another (default 30)")
    s.add_argument("--router-probe", action="store_const", const=True, default=None,
                   help="let the router probe the model's confidence with and without context")
    s.add_argument("--log-level", default=None)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("ingest", help="add or update documents from a JSON-lines corpus file")
    _common(s)
    s.add_argument("file", type=Path, help='JSON lines: {"id": str, "title": str (optional), "text": str}')
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--build", default="", help="artefacts to build after ingest, comma-separated: kv, adapters")
    s.add_argument("--prompt-layout", help="the layout the KV caches are built for: the server's --prompt-layout "
                                           "(env KNOWMUX_PROMPT_LAYOUT)")
    _device_flags(s)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("ask", help="ask a running server one question under several strategies, side by side")
    s.add_argument("question")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="the knowmux server (default %(default)s)")
    s.add_argument("--strategies", default="direct,rag", help="comma-separated (default %(default)s)")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--top-k", type=int)
    s.add_argument("--api-key", default=os.environ.get("KNOWMUX_API_KEY"), help="a client key (env KNOWMUX_API_KEY)")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("router", help="the router's classifier: knowmux router train --from RUN --out DIR; "
                                      "knowmux router publish DIR --kv-tier URL (for every replica)",
                       add_help=False)
    s.set_defaults(func=None)

    s = sub.add_parser("bench", help="latency/accuracy benchmark of the strategies (see knowmux bench --help)",
                       add_help=False)
    s.set_defaults(func=None)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmark has its own parser
        from bench.run import main as bench_main

        return bench_main(argv[1:])
    if argv[:2] == ["router", "train"]:
        from .router.train import main as train_main

        logging.basicConfig(level=logging.WARNING)
        return train_main(argv[2:])
    if argv[:2] == ["router", "publish"]:
        from .router.shared import main as publish_main

        return publish_main(argv[2:])
    args = ap.parse_args(argv)
    if args.func is None:
        print("knowmux router: the subcommands are `knowmux router train --from RUN --out DIR` and "
              "`knowmux router publish DIR --kv-tier URL`", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, (getattr(args, "log_level", None) or "INFO").upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss's loader reports at INFO, as a ModuleNotFoundError, each CPU-specific build its
    # wheel does not ship before it loads the one it has: noise that reads like a failure
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from indexes.pgstore import StoreUnavailable

    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, StoreUnavailable) as e:
        print(f"knowmux: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("knowmux: interrupted", file=sys.stderr)
        return 130


def _settings(args) -> Settings:
    keys = ("data_dir", "model", "host", "port", "engine", "threads", "max_batch_size", "max_queue",
            "max_tokens_in_flight", "experiments", "default_strategy", "router_probe", "chat_template", "log_level",
            "default_temperature", "default_top_p", "prompt_layout", "device", "dtype", "kv_tier", "kv_store_bytes", "max_context",
            "store", "job_lease_s", "builds", "tensor_parallel_size", "gpu_memory_utilization", "max_loras", "max_lora_rank")
    return Settings.from_env(**{k: getattr(args, k, None) for k in keys})


def cmd_setup(args) -> int:
    from .modelfiles import ensure_default_model

    print(ensure_default_model())
    return 0


def cmd_serve(args) -> int:
    from .api.app import create_app
    from .api.auth import Keys, check_exposure
    from .strategies import NAMES

    settings = _settings(args)
    check_exposure(settings, Keys.from_settings(settings))  # before the model loads
    if settings.experiments is not None:  # a bad file stops the start with its line, before the model loads
        from .router.experiments import parse

        parse(Path(settings.experiments).read_text(encoding="utf-8"), list(NAMES), str(settings.experiments))
    if settings.default_strategy not in NAMES:
        raise ValueError(f"unknown default strategy {settings.default_strategy!r}")
    if settings.chat_template is not None and not Path(settings.chat_template).is_file():
        raise ValueError(f"KNOWMUX_CHAT_TEMPLATE: no file {settings.chat_template}")  # before the model loads
    app = create_app(settings)
    serve_app(app, settings.host, settings.port, settings.log_level)
    return 1 if app.state.engine_died else 0


def serve_app(app, host: str, port: int, log_level: str = "info") -> None:
    """uvicorn with a handle for the engine watchdog to ask for a graceful shutdown."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    app.state.request_exit = lambda: setattr(server, "should_exit", True)
    server.run()


def cmd_ingest(args) -> int:
    from indexes import KnowledgeBase
    from indexes.ingest import DocumentError, ingest, read_corpus

    from .runtime import embedder_for, engine_for

    settings = _settings(args)
    try:
        docs = read_corpus(args.file, settings.max_document_chars)
    except DocumentError as e:
        print(f"knowmux ingest: {e}", file=sys.stderr)
        return 2
    from .artefacts import KINDS

    builds = [b for b in args.build.split(",") if b]
    unknown = set(builds) - set(KINDS)
    if unknown:
        print(f"knowmux ingest: unknown --build {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}",
              file=sys.stderr)
        return 2
    engine = None
    if builds:  # loaded first: the embedder then runs on the engine's thread (server.engine.compute)
        engine = engine_for(settings)
        engine.start()
    try:
        kb = KnowledgeBase(settings.data_dir, embedder_for(engine, settings.device), store=settings.store)
        try:
            rep = ingest(kb, docs, batch_size=args.batch_size)
            total = kb.count()
            print(f"{args.file}: {rep.created} created, {rep.updated} updated, {rep.unchanged} unchanged; "
                  f"{total} documents in {kb.store.describe()}")
            if builds and build(settings, engine, kb, [d.id for d in docs], builds):
                return 1
        finally:
            kb.close()
    finally:
        if engine is not None:
            engine.shutdown()
    return 0


def build(settings: Settings, engine, kb, doc_ids: list[str], kinds: list[str]) -> int:
    """Build each document's artefacts with a started engine; what is stored already is
    skipped, so an interrupted build (crash, Ctrl-C) loses at most the group in flight (one
    document for KV caches, ``adapter_build_group`` for adapters). Returns how many failed."""
    import time
    from collections import Counter

    from tqdm import tqdm

    from .jobs import build_ids, outcome
    from .runtime import assemble

    n_failed = 0
    artefacts = assemble(engine, kb, settings, data_dir=settings.data_dir).artefacts
    for kind in kinds:
        service = artefacts.builder(kind)
        if service is None:
            raise ValueError(f"the {engine.name} engine cannot build {kind}; use --engine torch")
        counts: Counter = Counter()
        failed: list[str] = []
        t0 = time.perf_counter()
        todo = list(dict.fromkeys(doc_ids))
        group = getattr(service, "build_group", 1)
        with tqdm(total=len(todo), desc=kind, unit="doc") as bar:
            for g in range(0, len(todo), group):
                ids = todo[g:g + group]
                for doc_id, result in zip(ids, build_ids(service, kb, ids)):
                    what = outcome(result)
                    counts[what] += 1
                    if what == "failed":
                        failed.append(f"{doc_id}: {type(result).__name__}: {result}")
                bar.update(len(ids))
        built, skipped = counts["built"], counts["skipped"]
        dt = time.perf_counter() - t0
        print(f"{kind}: {built} built, {skipped} already stored" +
              (f", {len(failed)} failed" if failed else "") +
              (f"; {dt / built:.2f} s per built document" if built else ""))
        for line in failed:
            print(f"  failed {line}", file=sys.stderr)
        n_failed += len(failed)
    return n_failed


def cmd_ask(args) -> int:
    """One request naming every strategy (they share the engine's batch); each answer with
    its time to first token, total time, prompt size, mean token logprob and retrieval."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line per request is noise here
    strategies = [x for x in args.strategies.split(",") if x]
    url, headers = args.url.rstrip("/"), {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json().get("data") or [{}]
        body = {"model": models[0].get("id", "knowmux"), "messages": [{"role": "user", "content": args.question}],
                "temperature": 0, "max_tokens": args.max_tokens, "logprobs": True, "strategies": strategies}
        if args.top_k is not None:
            body["top_k"] = args.top_k
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
    except (httpx.HTTPError, ValueError) as e:
        print(f"knowmux ask: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:500]
        print(f"knowmux ask: {r.status_code}: {message}", file=sys.stderr)
        return 1
    data = r.json()
    for c in data["choices"]:
        kx = c.get("knowmux") or data.get("knowmux", {})  # one choice: the response's own
        usage = kx.get("usage") or data.get("usage", {})
        t, lps = kx.get("timings_ms", {}), (c.get("logprobs") or {}).get("content") or []
        mean_lp = sum(x["logprob"] for x in lps) / len(lps) if lps else float("nan")
        docs = ", ".join(f"{d['id']} ({d['score']:.2f})" for d in kx.get("retrieved", [])) or "-"
        print(f"[{kx.get('strategy', '?')}] ttft {t.get('ttft', float('nan')):.0f} ms, total "
              f"{t.get('total', float('nan')):.0f} ms, {usage.get('prompt_tokens', '?')} prompt "
              f"tokens, mean logprob {mean_lp:.2f}; retrieved: {docs}")
        print("  " + " ".join(c["message"]["content"].split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
