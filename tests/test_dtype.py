"""The torch engine in bfloat16 and float16 (on the CPU here; the same code runs on a GPU):
the runner against transformers in the same dtype, every strategy through the API, and
KV caches kept in their dtype. Device and dtype settings are checked before a model loads."""


import httpx
import pytest
import torch

from server.config import Settings
from server.engine.model import LlamaRunner, Segment
from server.engine.torch_engine import TorchEngine
from server.kv.service import KVService
from server.kv.store import KVStore
from server.prompt import Passage, PromptBuilder
from tests.engine_util import Collector, greedy
from server.engine.types import GenRequest, RowSpec
from tests.conftest import wait_for_job
from tests.tiny import tiny_model, tiny_model_folder, tiny_tokenizer

LOW = [torch.bfloat16, torch.float16]
# one rounding of a bf16 / fp16 mantissa on logits of magnitude ~10 (the tiny model's)
TOL = {torch.bfloat16: 0.1, torch.float16: 0.02}


def low_engine(dtype, seed=0):
    return TorchEngine(tiny_model(seed).to(dtype), tiny_tokenizer(), model_id=f"tiny-{dtype}")


@pytest.mark.parametrize("dtype", LOW)
def test_the_runner_matches_transformers_in_the_same_dtype(dtype):
    ids = list(range(5, 45))
    ref_model = tiny_model().to(dtype)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids + [7]])).logits[0].float()
    runner = LlamaRunner(tiny_model().to(dtype))
    assert runner.dtype == dtype and runner.kernels == {}  # F.linear, not the float32 CPU kernels
    cache = runner.new_cache(64)
    assert cache.kv.dtype == dtype
    prefill = runner.forward(runner.ids(ids), [Segment(cache, 0, len(ids), want_logits=True)])[0]
    step = runner.forward(runner.ids([7]), [Segment(cache, 0, 1, want_logits=True)])[0]
    assert prefill.dtype == torch.float32  # logits leave the model in float32 (sampling, CK-PLUG)
    torch.testing.assert_close(prefill, ref[-2], atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(step, ref[-1], atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", LOW)
def test_batched_greedy_decoding_matches_transformers_generate(dtype):
    eng = low_engine(dtype)
    prompts = [[5, 9, 13, 200, 31], list(range(40, 77)), [250, 3, 90]]
    got = []
    for i, p in enumerate(prompts):
        c = Collector()
        eng.worker.submit(GenRequest(f"r{i}", [RowSpec(p)], greedy(8)), c)
        got.append(c)
    while eng.worker.step():  # the three decode together (pooled attention)
        pass
    ref_model = tiny_model().to(dtype)
    for p, c in zip(prompts, got):
        out = ref_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                 pad_token_id=0)[0, len(p):].tolist()
        # a near-tie may flip in a low precision; the first tokens must agree
        assert c.tokens[:4] == out[:4], (dtype, p)


@pytest.mark.parametrize("dtype", LOW)
def test_a_stored_passage_injected_in_low_precision_matches_the_full_prefill(tmp_path, dtype):
    eng = low_engine(dtype)
    kv = KVService(eng, PromptBuilder(eng.tokenizer), KVStore(tmp_path / "kv"))
    layout = kv.prompts.with_passages([{"role": "user", "content": "Where does Zorbl live?"}],
                                      [Passage("a", "Zorbl", "Zorbl is a purple cat who lives on the moon."),
                                       Passage("b", "Paris", "Paris is the capital of France.")])
    entries = [kv.passage(p, ids).entry for p, ids in zip("ab", layout.passages)]
    assert all(e.kv.dtype == dtype for e in entries)
    kv.store.forget_memory()
    assert kv.passage("a", layout.passages[0]).source == "disk"  # stored and read back in its dtype
    prefix = kv.join(entries[:1])
    r = eng.runner
    cache = r.new_cache(prefix.length + len(layout.tail) + len(layout.passages[1]))
    cache.import_prefix(prefix)
    n = len(layout.head) + len(layout.passages[0])
    ids = layout.head + layout.passages[0] + layout.tail
    got = r.forward(r.ids(layout.tail), [Segment(cache, 0, len(layout.tail), want_logits=True)])[0]
    full = r.new_cache(len(ids))
    ref = r.forward(r.ids(ids), [Segment(full, 0, len(ids), want_logits=True)])[0]
    assert prefix.length == n
    torch.testing.assert_close(got, ref, atol=2 * TOL[dtype], rtol=0)


def test_a_cache_built_in_one_dtype_is_never_used_by_another(tmp_path):
    passage = Passage("a", "Zorbl", "Zorbl is a purple cat who lives on the moon.")
    bf = low_engine(torch.bfloat16)
    kv_bf = KVService(bf, PromptBuilder(bf.tokenizer), KVStore(tmp_path / "kv"))
    ids = kv_bf.prompts.passage_ids(passage)
    assert kv_bf.passage("a", ids).source == "built"
    f32 = TorchEngine(tiny_model(), tiny_tokenizer(), model_id="tiny-torch.bfloat16")
    kv_32 = KVService(f32, PromptBuilder(f32.tokenizer), KVStore(tmp_path / "kv"))
    assert kv_32.key(ids) != kv_bf.key(ids)  # the dtype is part of the key
    assert kv_32.passage("a", ids, build=False) is None
    # a file that claims one dtype's key but holds another's tensor is refused, not injected
    assert kv_32.store.get(kv_bf.key(ids), torch.float32) == (None, "corrupt")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_strategy_serves_in_low_precision(tmp_path, embedder, dtype):
    from server.runtime import Runtime
    from tests.conftest import LiveServer

    folder = tiny_model_folder(tmp_path / "model")
    eng = TorchEngine.from_folder(folder, device="cpu", dtype=dtype)
    assert eng.dtype == dtype and eng.device == "cpu"
    s = Settings.from_env(env={}, data_dir=tmp_path / "data", adapter_recipe="paper-answer-loss", dtype=dtype)
    with LiveServer(Runtime.build(s, engine=eng, embedder=embedder)) as srv:
        docs = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."},
                {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}]
        job = httpx.post(srv.url + "/v1/documents", json={"documents": docs, "build": ["kv", "adapters"]}).json()
        for j in job["jobs"]:
            j = wait_for_job(srv.url, j, timeout=180)
            assert j["status"] == "done" and j["built"] == 2, j
        health = httpx.get(srv.url + "/health").json()
        assert health["device"] == "cpu" and health["dtype"] == dtype
        assert health["kv_store"]["disk_files"] == 2 and health["kv_pool"]["dtype"] == dtype
        for strategy in ("direct", "rag", "rag+ckplug", "kv", "kv+ckplug", "prag", "prag+rag", "auto"):
            r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": strategy}, timeout=120,
                           json={"model": "knowmux", "messages": [{"role": "user", "content": "Where does Zorbl live?"}],
                                 "max_tokens": 4, "temperature": 0.7, "seed": 1, "top_k": 2})
            assert r.status_code == 200, (strategy, r.text)
            kx = r.json()["knowmux"]
            assert r.json()["usage"]["completion_tokens"] >= 1
            if strategy.startswith("kv"):
                assert set(kx["kv"]["sources"].values()) == {"memory"} and not kx["kv"]["built_now"], kx
            if strategy.startswith("prag"):
                assert kx["adapters_applied"] == 2, kx


def test_device_and_dtype_settings_are_checked_before_a_model_loads():
    assert Settings(device="CUDA:1", dtype="bf16").dtype == "bfloat16"
    for bad in (dict(device="gpu"), dict(dtype="int8"), dict(device="cuda:x")):
        with pytest.raises(ValueError, match="--d"):
            Settings(**bad)
    from server.engine.device import resolve_device, resolve_dtype

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu"), torch.bfloat16) == torch.float32  # fp32: the CPU's fast path
    assert resolve_dtype("auto", torch.device("cuda"), torch.float32) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_gpu_deployment_settings_are_checked_and_reach_only_the_engine_that_takes_them(tmp_path):
    from server.cli import _settings, main
    from server.runtime import engine_for

    for bad in (dict(tensor_parallel_size=0), dict(gpu_memory_utilization=1.5), dict(max_loras=0),
                dict(max_lora_rank=-1)):
        with pytest.raises(ValueError, match="KNOWMUX_"):
            Settings(**bad)
    import argparse

    args = argparse.Namespace(max_context=4096, tensor_parallel_size=2, gpu_memory_utilization=0.8, max_loras=4,
                              max_lora_rank=64, engine="vllm")
    s = _settings(args)
    assert (s.max_context, s.tensor_parallel_size, s.gpu_memory_utilization, s.max_loras, s.max_lora_rank) == \
        (4096, 2, 0.8, 4, 64)
    with pytest.raises(ValueError, match="needs --engine vllm"):
        engine_for(Settings(engine="torch", tensor_parallel_size=2, model=str(tmp_path)))
    with pytest.raises(SystemExit):  # argparse knows the flags
        main(["serve", "--max-model-len", "x"])
